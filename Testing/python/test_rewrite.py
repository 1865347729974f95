"""Exact network rewrites for the CPU (medseg.rewrite): the same function as the original, weights shared."""

from __future__ import annotations

import pytest
import torch
from medseg import rewrite
from monai.networks.blocks import ResidualUnit
from monai.networks.nets import DynUNet, UNet


def transposed(cin, cout, kernel, stride, padding, output_padding, bias=True, seed=0) -> torch.nn.ConvTranspose3d:
    torch.manual_seed(seed)
    return torch.nn.ConvTranspose3d(cin, cout, kernel, stride, padding, output_padding, bias=bias).eval()


@pytest.mark.parametrize(
    "kernel, stride, padding, output_padding",
    [
        (3, 2, 1, 1),  # MONAI UNet's up-sampling
        (2, 2, 0, 0),  # DynUNet's
        (4, 2, 1, 0),
        (3, 3, 0, 0),
        ((3, 3, 1), (2, 2, 1), (1, 1, 0), (1, 1, 0)),  # anisotropic: no up-sampling along the last axis
        (5, 2, 2, 1),
    ],
)
@pytest.mark.parametrize("bias", [True, False])
def test_a_sub_pixel_convolution_is_the_transposed_convolution(kernel, stride, padding, output_padding, bias):
    conv = transposed(6, 3, kernel, stride, padding, output_padding, bias)
    assert rewrite.subpixel_eligible(conv)
    x = torch.randn(2, 6, 5, 7, 4, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected, got = conv(x), rewrite.SubPixelConvTranspose3d(conv)(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize(
    "conv",
    [
        torch.nn.ConvTranspose3d(4, 4, 3, 2, 1),  # output 2n - 1: not a stride multiple
        torch.nn.ConvTranspose3d(4, 4, 3, 2, 1, 1, groups=2),
        torch.nn.ConvTranspose3d(4, 4, 3, 2, 2, 1, dilation=2),
        torch.nn.ConvTranspose3d(4, 4, 3, 1, 1),  # no up-sampling at all
        torch.nn.Conv3d(4, 4, 3),
    ],
)
def test_other_convolutions_are_left_alone(conv):
    assert not rewrite.subpixel_eligible(conv)
    with pytest.raises(ValueError):
        rewrite.SubPixelConvTranspose3d(conv)


def small_unet(classes: int = 2) -> UNet:
    torch.manual_seed(0)
    return UNet(3, 1, classes, channels=(8, 16, 32), strides=(2, 2), num_res_units=2).eval()


def conv_only_units(network: torch.nn.Module) -> list:
    return [m for m in network.modules() if isinstance(m, ResidualUnit) and rewrite.folded_residual(m) is not None]


@pytest.mark.parametrize("float32", [True, False])
def test_a_unets_few_channel_up_sampling_and_last_residual_are_rewritten_and_the_rest_is_shared(float32):
    net = small_unet()
    assert len(conv_only_units(net)) == 1  # MONAI's top unit: conv(x) + x
    cpu = rewrite.for_cpu(net, float32=float32)
    assert cpu is not net
    kinds = [type(m) for m in cpu.modules()]
    # the last up-sampling (16 -> 2 classes) is rewritten; the one to 8 channels too (8 < 16)
    assert kinds.count(rewrite.SubPixelConvTranspose3d) == 2
    assert not any(isinstance(m, torch.nn.ConvTranspose3d) for m in cpu.modules())
    # the identity residual is folded in float32 only: in bfloat16 a centre tap of 1 + w would round the identity
    assert len(conv_only_units(cpu)) == (0 if float32 else 1)
    assert not any(isinstance(m, rewrite.SubPixelConvTranspose3d) for m in net.modules())  # the original untouched
    assert len(conv_only_units(net)) == 1
    original = {p.data_ptr() for p in net.parameters()}
    new = [p for p in cpu.parameters() if p.data_ptr() not in original]
    assert sum(p.numel() for p in new) == (2 * 2 * 27 + 2 if float32 else 0)  # only the folded convolution's own
    x = torch.randn(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        expected, got = net(x), cpu(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))
    assert rewrite.for_cpu(net, float32=float32) is cpu  # kept while the weights stay


def test_a_residual_unit_with_a_norm_or_a_projection_is_not_folded():
    torch.manual_seed(0)
    plain = ResidualUnit(3, 4, 4, subunits=1, last_conv_only=True).eval()
    folded = rewrite.folded_residual(plain)
    x = torch.randn(1, 4, 9, 8, 7)
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), plain(x), rtol=0, atol=1e-5 * float(plain(x).abs().max()))
    double = ResidualUnit(3, 4, 4, subunits=1, last_conv_only=True).eval().double()
    with torch.inference_mode():  # the folded convolution keeps the unit's dtype: no float32 rounding on the way
        torch.testing.assert_close(rewrite.folded_residual(double)(x.double()), double(x.double()), rtol=0, atol=1e-12)
    assert rewrite.folded_residual(ResidualUnit(3, 4, 4, subunits=1)) is None  # norm and activation after the conv
    assert rewrite.folded_residual(ResidualUnit(3, 4, 8, subunits=1, last_conv_only=True)) is None  # a projection
    assert rewrite.folded_residual(ResidualUnit(3, 4, 4, strides=2, subunits=1, last_conv_only=True)) is None


def test_the_rewrite_follows_changed_weights():
    net = small_unet()
    before = rewrite.for_cpu(net)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(1.5)  # an optimiser step changes weights in place
    after = rewrite.for_cpu(net)
    assert after is not before
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        torch.testing.assert_close(after(x), net(x), rtol=0, atol=1e-5 * float(net(x).abs().max()))


def test_a_network_without_few_channel_transposed_convolutions_is_returned_as_it_is():
    dyn = DynUNet(3, 1, 4, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2]).eval()
    assert rewrite.for_cpu(dyn) is dyn  # its transposed convolutions have 32 and more channels
    wide = UNet(3, 1, 16, channels=(16, 32), strides=(2,), num_res_units=0).eval()
    assert rewrite.for_cpu(wide) is wide  # 16 classes: the wider convolution would not pay
