"""Exact network rewrites for the CPU (medseg.rewrite): the same function as the original, weights shared."""

from __future__ import annotations

import copy

import pytest
import torch
from medseg import rewrite
from monai.networks.blocks import ResidualUnit
from monai.networks.layers import SkipConnection
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
    # the last up-sampling (16 -> 2 classes) is rewritten; the one to 8 channels too (8 < 16). In float32 the last
    # one, its norm and activation and the folded residual run on the coarse grid (a PhaseSpaceTail)
    assert kinds.count(rewrite.SubPixelConvTranspose3d) == (1 if float32 else 2)
    assert kinds.count(rewrite.PhaseSpaceTail) == (1 if float32 else 0)
    # and the top skip connection's concatenation is two convolutions into the tail
    assert kinds.count(rewrite.SkipIntoTail) == (1 if float32 else 0)
    assert kinds.count(SkipConnection) == (1 if float32 else 2)
    assert not any(isinstance(m, torch.nn.ConvTranspose3d) for m in cpu.modules())
    # the identity residual is folded in float32 only: in bfloat16 a centre tap of 1 + w would round the identity
    assert len(conv_only_units(cpu)) == (0 if float32 else 1)
    assert not any(isinstance(m, rewrite.SubPixelConvTranspose3d) for m in net.modules())  # the original untouched
    assert len(conv_only_units(net)) == 1
    original = {t.data_ptr() for t in net.state_dict().values()}
    new = [t for t in cpu.state_dict().values() if t.data_ptr() not in original]
    # only the rearranged up-samplings' weights are new (48 to 8 channels: 8 phases of a 2^3 kernel; 16 to 2, in
    # float32 in the tail, phases then classes) and, in float32, the tail's shifted convolution (8 phases of 2
    # classes in and out, 2^3 taps) and its group norm's 16 x 16 averaging of phase channels
    inner = (8 * 8) * 48 * 8 + 8 * 8
    last = (8 * 2) * 16 * 8 + 8 * 2
    tail = (8 * 2) * (8 * 2) * 8 + 8 * 2 + (8 * 2) ** 2
    assert sum(t.numel() for t in new) == inner + last + (tail if float32 else 0)
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


def top_block(classes=3, *, norm="instance", act="prelu", ordering="NDA", seed=0, **residual) -> torch.nn.Sequential:
    """A MONAI U-Net's top up-sampling block: a transposed convolution to the classes with norm and activation, then
    a conv-only residual unit."""
    from monai.networks.blocks import Convolution

    torch.manual_seed(seed)
    up = Convolution(
        3, 8, classes, strides=2, kernel_size=3, norm=norm, act=act, adn_ordering=ordering, is_transposed=True
    )
    unit = ResidualUnit(3, classes, classes, subunits=1, last_conv_only=True, **residual)
    block = torch.nn.Sequential(up, unit).eval()
    with torch.no_grad():  # norm and activation weights away from their identity defaults
        for name, p in block.named_parameters():
            if "adn" in name:
                p.copy_(torch.rand(p.shape, generator=torch.Generator().manual_seed(5)) + 0.25)
    return block


@pytest.mark.parametrize(
    "classes, norm, act, ordering",
    [
        (2, "instance", "prelu", "NDA"),  # MONAI's U-Net defaults
        (3, ("instance", {"affine": True}), ("prelu", {"num_parameters": 3}), "NDA"),
        (3, ("instance", {"affine": True}), ("leakyrelu", {"negative_slope": 0.2}), "AN"),
        (1, "instance", "relu", "ND"),
        (5, None, "prelu", "A"),
    ],
)
def test_a_unets_top_block_on_the_coarse_grid_is_the_block(classes, norm, act, ordering):
    block = top_block(classes, norm=norm, act=act, ordering=ordering)
    tail = rewrite.phase_space_tail(block)
    assert isinstance(tail, rewrite.PhaseSpaceTail)
    for shape in [(5, 7, 4), (1, 1, 1), (12, 3, 6)]:  # any input grid: the output is twice it
        x = torch.randn(2, 8, *shape, generator=torch.Generator().manual_seed(sum(shape)))
        with torch.inference_mode():
            expected, got = block(x), tail(x)
        assert got.shape == expected.shape == (2, classes, *(2 * n for n in shape))
        torch.testing.assert_close(got, expected, rtol=0, atol=2e-5 * float(expected.abs().max()))


@pytest.mark.parametrize(
    "change",
    [
        "anisotropic",  # no up-sampling along one axis
        "running statistics",  # an instance norm that keeps them is an affine map in evaluation
        "dropout while training",
        "group norm",  # a norm across classes: not a per-class norm over its phases
        "two subunits",  # the residual does not fold
        "a kernel of 5",
    ],
)
def test_other_top_blocks_keep_their_full_resolution_form(change):
    from monai.networks.blocks import Convolution

    block = top_block()
    if change == "anisotropic":
        block[0] = Convolution(3, 8, 3, strides=(2, 2, 1), kernel_size=(3, 3, 1), is_transposed=True)
    elif change == "running statistics":
        block[0].adn.N = torch.nn.InstanceNorm3d(3, track_running_stats=True).eval()
    elif change == "dropout while training":
        block[0].adn.D = torch.nn.Dropout(0.2).train()
    elif change == "group norm":
        block[0].adn.N = torch.nn.GroupNorm(1, 3)
    elif change == "two subunits":
        block[1] = ResidualUnit(3, 3, 3, subunits=2, last_conv_only=True)
    else:
        block[1] = ResidualUnit(3, 3, 3, kernel_size=5, subunits=1, last_conv_only=True)
    assert rewrite.phase_space_tail(block) is None
    assert rewrite.phase_space_tail(top_block()) is not None  # the unchanged block is taken


@pytest.mark.parametrize("groups, channels, affine", [(2, 16, False), (3, 24, True), (1, 8, True), (8, 8, False)])
def test_the_tails_group_norm_from_per_channel_reductions_is_pytorchs(groups, channels, affine):
    generator = torch.Generator().manual_seed(channels + groups)
    # an offset far from zero: two passes keep the variance exact where E[y^2] - E[y]^2 would cancel
    y = 3.0 * torch.randn(2, channels, 5, 6, 7, generator=generator, dtype=torch.float64) + 40.0
    weight = torch.rand(channels, generator=generator, dtype=torch.float64) + 0.5 if affine else None
    bias = torch.randn(channels, generator=generator, dtype=torch.float64) if affine else None
    average = rewrite.group_average(channels, groups).double()
    got = rewrite.phase_group_norm(y, average, weight, bias, 1e-5)
    torch.testing.assert_close(got, torch.nn.functional.group_norm(y, groups, weight, bias, 1e-5), rtol=0, atol=1e-12)
    single = rewrite.phase_group_norm(y.float(), average.float(), None, None, 1e-5)
    expected = torch.nn.functional.group_norm(y.float(), groups, None, None, 1e-5)
    torch.testing.assert_close(single, expected, rtol=0, atol=2e-5)  # float32: the group's values are ~ N(0, 1)


def test_the_top_skip_into_the_tail_is_the_concatenation_into_the_block():
    inner = torch.nn.Conv3d(8, 5, 3, padding=1).eval()  # cat([x, inner(x)]): 8 + 5 channels into the top block
    block = top_block(classes=3)
    block[0].conv = torch.nn.ConvTranspose3d(13, 3, 3, 2, 1, 1).eval()
    original = torch.nn.Sequential(SkipConnection(inner), block).eval()
    merged = rewrite.for_cpu(original)
    assert [type(m) for m in merged.children()] == [rewrite.SkipIntoTail]
    x = torch.randn(2, 8, 6, 5, 4, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        expected, got = original(x), merged(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5 * float(expected.abs().max()))
    added = torch.nn.Sequential(SkipConnection(torch.nn.Conv3d(8, 8, 3, padding=1), mode="add"), top_block(classes=3))
    assert [type(m) for m in rewrite.for_cpu(added).children()] == [SkipConnection, rewrite.PhaseSpaceTail]


@pytest.mark.parametrize("num_res_units", [2, 0])
def test_a_two_class_unets_difference_is_computed_by_its_rewritten_tail(num_res_units):
    torch.manual_seed(0)
    net = UNet(3, 1, 2, channels=(8, 16, 32), strides=(2, 2), num_res_units=num_res_units).eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    body = rewrite.two_class_difference(net)
    assert rewrite.two_class_difference(net) is body  # one per network: caches key on it
    assert set(net.state_dict()) == set(before)  # held outside the network's modules and state dict
    cpu = rewrite.for_cpu(body)
    x = torch.randn(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        logits, got = net(x), cpu(x)
    expected = logits[:, 1:] - logits[:, :1]
    torch.testing.assert_close(body(x), expected, rtol=0, atol=0)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * float(logits.abs().max()))
    if num_res_units:  # the phase-space tail computes the difference: its last convolution has 8 phase outputs
        assert type(cpu) is UNet and type(cpu.model[-1]) is rewrite.SkipIntoTail
        assert cpu.model[-1].tail.conv_weight.shape[0] == 8 and cpu.model[-1].tail.out_channels == 1
        assert rewrite.for_cpu(net).model[-1].tail.out_channels == 2  # the logits' rewrite keeps its own tail
    else:  # no tail to fold into: the difference is taken after the rewritten network
        assert type(cpu) is rewrite.TwoClassDifference
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key])
    for copied in (copy.deepcopy(net), copy.copy(net)):
        assert rewrite.two_class_difference(copied) is not body
        assert rewrite.two_class_difference(copied).network is copied
    assert rewrite.two_class_difference(net) is body
    with pytest.raises(ValueError, match="returning 3 channels"):
        rewrite.two_class_difference(UNet(3, 1, 3, channels=(8, 16), strides=(2,)).eval())(x)
