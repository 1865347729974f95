"""Model folders: cards validated field by field, weights checked against the card, models found by id."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import card_dict, write_model_folder
from medseg.errors import ModelCardError, ModelNotFoundError
from medseg.models import find_model_folder, list_models
from medseg.models.card import card_from_dict
from medseg.models.folder import load_model_folder


def edit_card(folder, change):
    data = json.loads((folder / "model.json").read_text())
    change(data)
    (folder / "model.json").write_text(json.dumps(data))


def test_valid_folder_loads_with_weights(tiny_model):
    loaded = load_model_folder(tiny_model)
    assert loaded.card.id == "tiny-test"
    assert loaded.card.num_classes == 3
    saved = torch.load(tiny_model / "model.pt", weights_only=True)
    for name, tensor in loaded.network.state_dict().items():
        torch.testing.assert_close(tensor, saved[name])
    assert not loaded.network.training


@pytest.mark.parametrize(
    ("field", "message"),
    [
        ("labels", "missing field 'labels'"),
        ("network", "missing field 'network'"),
        ("preprocessing", "missing field 'preprocessing'"),
        ("inference", "missing field 'inference'"),
        ("weights", "missing field 'weights'"),
        ("id", "missing field 'id'"),
    ],
)
def test_card_with_a_missing_field_names_it(tiny_model, field, message):
    edit_card(tiny_model, lambda d: d.pop(field))
    with pytest.raises(ModelCardError, match=rf"model\.json: {message}"):
        load_model_folder(tiny_model)


def test_nested_missing_field_is_named_with_its_path(tiny_model):
    edit_card(tiny_model, lambda d: d["labels"][1].pop("color"))
    with pytest.raises(ModelCardError, match=r"missing field 'labels\[1\]\.color'"):
        load_model_folder(tiny_model)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["network"].update(architecture="ResNet9000"), "unknown architecture 'ResNet9000'"),
        (lambda d: d["network"]["kwargs"].update(bogus=1), "UNet rejects the keyword arguments"),
        (lambda d: d["network"]["kwargs"].update(in_channels=1), "'in_channels' is set by MedSeg"),
        (lambda d: d["labels"][0].update(value=3), "values 1..N in order"),
        (lambda d: d["labels"][0].update(color=[0, 0, 300]), r"RGB in 0\.\.255"),
        (lambda d: d["preprocessing"]["normalization"].update(method="magic"), "expected one of zscore"),
        (lambda d: d["inference"].update(overlap=1.5), r"must be in \[0, 1\)"),
        (lambda d: d["inference"].update(roi_size=[16, 16]), "list of 3 numbers"),
        (lambda d: d["inference"].update(mirror_axes=[0, 3]), r"'inference.mirror_axes' must list distinct axes"),
        (lambda d: d["inference"].update(mirror_axes=[1, 1]), r"'inference.mirror_axes' must list distinct axes"),
        (lambda d: d["inference"].update(mirror_axes="xyz"), r"'inference.mirror_axes' must be list"),
        (lambda d: d["inference"].update(mirror_axes=[0.0]), r"'inference.mirror_axes' must list distinct axes"),
        (lambda d: d["inference"].update(mirror_axes=[True]), r"'inference.mirror_axes' must list distinct axes"),
        (lambda d: d.update(format_version=7), "reads versions 1, 2 \\(a newer MedSeg may read it\\)"),
        (lambda d: d["weights"].update(file="../elsewhere.pt"), "inside the model folder"),
        (lambda d: d.update(channels=[]), "at least one input channel"),
        (
            lambda d: d.update(labels=[{**d["labels"][0], "value": v, "name": f"l{v}"} for v in range(1, 257)]),
            r"'labels' has 256 labels; a labelmap holds at most 255 \(8 bits\)",
        ),
    ],
)
def test_invalid_card_fields_are_refused(tiny_model, change, message):
    edit_card(tiny_model, change)
    with pytest.raises(ModelCardError, match=message):
        load_model_folder(tiny_model)


def test_card_that_is_not_json(tiny_model):
    (tiny_model / "model.json").write_text("{ not json")
    with pytest.raises(ModelCardError, match="not valid JSON"):
        load_model_folder(tiny_model)


def _store_int8(folder):
    from medseg.models.folder import quantized, sha256_of

    state = torch.load(folder / "model.pt", weights_only=True)
    torch.save(quantized(state), folder / "model.pt")
    edit_card(folder, lambda d: d["weights"].update(storage="int8", sha256=sha256_of(folder / "model.pt")))
    return state


def test_int8_weights_load_within_their_rounding(tiny_model):
    original = _store_int8(tiny_model)
    stored = torch.load(tiny_model / "model.pt", weights_only=True)
    convolutions = [k for k, v in original.items() if v.dim() >= 2]
    assert convolutions and all(stored[k].dtype == torch.int8 for k in convolutions)
    loaded = load_model_folder(tiny_model)
    assert loaded.card.weights_storage == "int8"
    for name, tensor in loaded.network.state_dict().items():
        error = (tensor - original[name].float()).abs()
        if name in convolutions:  # half a step of its own channel at most
            half_step = original[name].float().abs().flatten(1).amax(1) / 127 / 2
            assert (error.flatten(1).amax(1) <= half_step * 1.0001 + 1e-9).all(), name
            assert not torch.equal(tensor, original[name].float()), "really rounded"
        else:
            assert error.max() <= 1e-3 * original[name].abs().max(), name


def test_int8_weights_without_their_scale_are_a_clear_error(tiny_model):
    _store_int8(tiny_model)
    state = torch.load(tiny_model / "model.pt", weights_only=True)
    name = next(k for k in state if k.endswith(":scale"))
    del state[name]
    torch.save(state, tiny_model / "model.pt")
    from medseg.models.folder import sha256_of

    edit_card(tiny_model, lambda d: d["weights"].update(sha256=sha256_of(tiny_model / "model.pt")))
    with pytest.raises(
        ModelCardError, match=r"model\.pt: int8 tensor .* needs a scale per slice along its first dimension"
    ):
        load_model_folder(tiny_model)
    edit_card(tiny_model, lambda d: d["weights"].update(storage="float"))
    with pytest.raises(ModelCardError, match=r"holds int8 weights with their scales, but .*'weights.storage' is not"):
        load_model_folder(tiny_model)
    edit_card(tiny_model, lambda d: d["weights"].update(storage="int4"))
    with pytest.raises(ModelCardError, match=r"'weights.storage' is 'int4'; expected one of float, int8"):
        load_model_folder(tiny_model)


def test_weights_changed_after_the_card_was_written(tiny_model):
    state = torch.load(tiny_model / "model.pt", weights_only=True)
    next(iter(state.values())).add_(1.0)
    torch.save(state, tiny_model / "model.pt")
    with pytest.raises(ModelCardError, match=r"model\.pt: SHA-256 is .* the card expects"):
        load_model_folder(tiny_model)


def test_card_that_does_not_match_its_weights(tmp_path):
    # Weights of a 2-label network, but a card that promises 3 labels: the checksum is right, the shapes are not.
    folder = write_model_folder(tmp_path / "m")
    edit_card(folder, lambda d: d["labels"].append({"value": 3, "name": "Extra", "color": [1, 2, 3]}))
    with pytest.raises(ModelCardError, match=r"do not match the network the card describes.*wrong shape"):
        load_model_folder(folder)


def test_card_with_other_network_size(tmp_path):
    folder = write_model_folder(tmp_path / "m")
    edit_card(folder, lambda d: d["network"]["kwargs"].update(channels=[4, 8, 16], strides=[2, 2]))
    with pytest.raises(ModelCardError, match="do not match.*missing"):
        load_model_folder(folder)


def test_weights_file_that_is_not_a_state_dict(tiny_model):
    (tiny_model / "model.pt").write_bytes(b"garbage")
    from medseg.models.folder import sha256_of

    edit_card(tiny_model, lambda d: d["weights"].update(sha256=sha256_of(tiny_model / "model.pt")))
    with pytest.raises(ModelCardError, match="cannot be read as PyTorch weights"):
        load_model_folder(tiny_model)


def test_pickled_code_in_weights_is_not_executed(tiny_model, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"weight": Evil()}, tiny_model / "model.pt")
    from medseg.models.folder import sha256_of

    edit_card(tiny_model, lambda d: d["weights"].update(sha256=sha256_of(tiny_model / "model.pt")))
    with pytest.raises(ModelCardError, match="cannot be read as PyTorch weights"):
        load_model_folder(tiny_model)
    assert not marker.exists()


def test_missing_weights_file(tiny_model):
    (tiny_model / "model.pt").unlink()
    with pytest.raises(ModelCardError, match="weights file named by the card is missing"):
        load_model_folder(tiny_model)


def test_unknown_model_id_lists_what_exists(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDSEG_HOME", str(tmp_path / "home"))
    with pytest.raises(ModelNotFoundError, match=r"unknown model 'no-such-model'; available: .*hippocampus-mri"):
        find_model_folder("no-such-model")


def test_missing_model_folder_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        find_model_folder(str(tmp_path / "nowhere" / "model"))


def test_registry_finds_user_models_before_bundled_and_reports_broken_ones(monkeypatch, tmp_path):
    root = tmp_path / "models"
    write_model_folder(root / "mine", id="hippocampus-mri", version="9.9")
    broken = root / "broken"
    broken.mkdir()
    (broken / "model.json").write_text("{}")
    monkeypatch.setenv("MEDSEG_MODEL_PATH", str(root))
    entries = list_models()
    by_folder = {e.folder.name: e for e in entries}
    assert by_folder["mine"].card.version == "9.9"
    assert by_folder["broken"].card is None and "missing field" in by_folder["broken"].problem
    assert find_model_folder("hippocampus-mri") == root / "mine"
    assert sum(1 for e in entries if e.card and e.card.id == "hippocampus-mri") == 1


def test_default_model_is_the_bundled_hippocampus(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDSEG_HOME", str(tmp_path))
    folder = find_model_folder(None)
    assert folder.name == "hippocampus-mri"
    assert load_model_folder(folder).card.labels[0].name == "Anterior hippocampus"


def test_card_round_trips_through_to_dict():
    card = card_from_dict(card_dict())
    again = card_from_dict(json.loads(json.dumps(card.to_dict())))
    assert again == card and card.inference.mirror_axes is None, "a card that does not say keeps not saying"
    data = card_dict(inference={"roi_size": [16, 16, 16], "mirror_axes": [2, 0]})
    data["weights"]["storage"] = "int8"
    card = card_from_dict(data)
    written = json.loads(json.dumps(card.to_dict()))
    assert written["format_version"] == 2 and written["inference"]["mirror_axes"] == [0, 2]
    assert card_from_dict(written) == card and card.weights_storage == "int8"


@pytest.mark.parametrize(
    ("architecture", "kwargs"),
    [
        ("UNet", {"channels": [4, 8], "strides": [2]}),
        ("BasicUNet", {"features": [4, 4, 8, 8, 16, 4]}),
        ("AttentionUnet", {"channels": [4, 8], "strides": [2]}),
        ("SegResNet", {"init_filters": 8}),
        ("DynUNet", {"kernel_size": [3, 3, 3], "strides": [1, 2, 2], "upsample_kernel_size": [2, 2]}),
        ("UNETR", {"img_size": [16, 16, 16], "feature_size": 4, "hidden_size": 48, "mlp_dim": 96, "num_heads": 4}),
        ("SwinUNETR", {"feature_size": 12, "depths": [1, 1, 1, 1]}),
    ],
)
def test_every_allow_listed_architecture_builds_from_a_card(tmp_path, architecture, kwargs):
    from medseg.models.architectures import ARCHITECTURES

    assert architecture in ARCHITECTURES
    folder = write_model_folder(tmp_path / architecture, network={"architecture": architecture, "kwargs": kwargs})
    network = load_model_folder(folder).network
    with torch.inference_mode():
        size = {"BasicUNet": 32, "SwinUNETR": 64}.get(architecture, 16)  # deep encoders need room
        out = network(torch.randn(1, 1, size, size, size))
    assert out.shape[:2] == (1, 3)
