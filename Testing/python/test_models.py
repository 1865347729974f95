"""Model folders: cards validated field by field, weights checked against the card, models found by id."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

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
    size = {"BasicUNet": 32, "SwinUNETR": 64}.get(architecture, 16)  # deep encoders need room
    folder = write_model_folder(
        tmp_path / architecture,
        network={"architecture": architecture, "kwargs": kwargs},
        inference={"roi_size": [size] * 3, "overlap": 0.25},
    )
    network = load_model_folder(folder).network
    with torch.inference_mode():
        out = network(torch.randn(1, 1, size, size, size))
    assert out.shape[:2] == (1, 3)


PERCENTILES = r"'preprocessing\.normalization\.clip_percentiles' must be \[low, high\] with 0 <= low < high <= 100"


@pytest.mark.parametrize(
    ("normalization", "message"),
    [
        ({"method": "range", "a_min": 400, "a_max": -1000}, r"'preprocessing\.normalization\.a_max' must be greater"),
        ({"method": "range", "a_min": 100, "a_max": 100}, r"'preprocessing\.normalization\.a_max' must be greater"),
        ({"method": "zscore", "clip_percentiles": [1, 101]}, PERCENTILES),
        ({"method": "zscore", "clip_percentiles": [99.5, 0.5]}, PERCENTILES),
        ({"method": "zscore", "clip_percentiles": [-1, 99]}, PERCENTILES),
    ],
)
def test_normalisation_bounds_that_cannot_work_are_refused_naming_the_field(tiny_model, normalization, message):
    edit_card(tiny_model, lambda d: d["preprocessing"].update(normalization=normalization))
    with pytest.raises(ModelCardError, match=rf"model\.json: field {message}"):
        load_model_folder(tiny_model)


@pytest.mark.parametrize("code", ["RRS", "LRS", "RAA", "SIA", "RA"])
def test_an_orientation_must_name_each_axis_once(tiny_model, code):
    edit_card(tiny_model, lambda d: d["preprocessing"].update(orientation=code))
    with pytest.raises(
        ModelCardError, match=r"'preprocessing\.orientation' must be a code like RAS or LPS \(one of R/L"
    ):
        load_model_folder(tiny_model)


def test_every_orientation_code_with_each_axis_once_is_accepted():
    import itertools

    codes = ["".join(c) for p in itertools.permutations(("RL", "AP", "SI")) for c in itertools.product(*p)]
    assert len(codes) == 48
    for code in codes + ["las", "Pir"]:
        card = card_from_dict(card_dict(preprocessing={**card_dict()["preprocessing"], "orientation": code}))
        assert card.preprocessing.orientation == code.upper()


@pytest.mark.parametrize(
    ("network", "roi", "message"),
    [
        ({"architecture": "UNet", "kwargs": {"channels": [4, 8], "strides": [2]}}, [17, 16, 16], r"multiple of"),
        (
            {
                "architecture": "DynUNet",
                "kwargs": {
                    "kernel_size": [3] * 3,
                    "strides": [1, [2, 2, 1], 2],
                    "upsample_kernel_size": [[2, 2, 1], 2],
                },
            },
            [16, 18, 16],
            r"DynUNet downsamples by \[4, 4, 2\] .* the nearest larger window that fits is \[16, 20, 16\]",
        ),
        (
            {"architecture": "SegResNet", "kwargs": {"init_filters": 8}},
            [16, 20, 16],
            r"SegResNet downsamples by \[8, 8, 8\]",
        ),
        (
            {
                "architecture": "UNETR",
                "kwargs": {
                    "img_size": [32, 32, 32],
                    "feature_size": 4,
                    "hidden_size": 48,
                    "mlp_dim": 96,
                    "num_heads": 4,
                },
            },
            [16, 16, 16],
            r"UNETR takes windows of its size only, network\.kwargs\.img_size \[32, 32, 32\]",
        ),
        ({"architecture": "SwinUNETR", "kwargs": {"feature_size": 12}}, [96, 96, 48], r"multiple of"),
        ({"architecture": "SwinUNETR", "kwargs": {"feature_size": 12}}, [32, 32, 32], r"one voxel at its deepest"),
        ({"architecture": "BasicUNet", "kwargs": {}}, [16, 16, 16], r"one voxel at its deepest"),
        ({"architecture": "BasicUNet", "kwargs": {}}, [64, 8, 64], r"must be at least that"),
    ],
)
def test_a_window_the_network_cannot_take_is_refused_when_the_card_is_read(tiny_model, network, roi, message):
    """Refused with the field's name when the card is read, not by a bare RuntimeError in the first window."""
    edit_card(tiny_model, lambda d: d.update(network=network) or d["inference"].update(roi_size=roi))
    field = rf"model\.json: field 'inference\.roi_size' is {re.escape(str(roi))}: "
    with pytest.raises(ModelCardError, match=field + ".*" + message):
        load_model_folder(tiny_model)


def test_windows_the_networks_take_still_load(bundled_model_dir):
    """The bundled card, and the windows the tests, benchmarks and training configs use, with their networks."""
    import sys

    from medseg.models.card import read_card

    sys.path.insert(0, str(bundled_model_dir.parents[2] / "benchmarks"))
    from inference import UNTRAINED  # benchmarks/inference.py: the untrained models at 96^3 and 128^3

    assert read_card(bundled_model_dir).inference.roi_size == (40, 56, 40)
    for architecture, kwargs in UNTRAINED.values():
        for roi in ([96] * 3, [128] * 3):
            card_from_dict(
                card_dict(network={"architecture": architecture, "kwargs": kwargs}, inference={"roi_size": roi})
            )
    for config in sorted((bundled_model_dir.parents[2] / "training" / "configs").glob("*.json")):
        card = json.loads(config.read_text())["card"]
        card.setdefault("format_version", 1)
        card["weights"] = {"sha256": "0" * 64}
        card_from_dict(card, config)
    for roi, kwargs in (
        ([16, 16, 16], {"channels": [4, 8], "strides": [2]}),
        ([20, 16, 12], {"channels": [4, 8], "strides": [2]}),
    ):
        card_from_dict(card_dict(network={"architecture": "UNet", "kwargs": kwargs}, inference={"roi_size": roi}))
    for architecture in ("DeepLab3D", "FCN3D"):  # they interpolate back to the input's size from any window
        card_from_dict(
            card_dict(network={"architecture": architecture, "kwargs": {}}, inference={"roi_size": [17, 9, 23]})
        )


def test_reading_a_card_imports_no_torch(bundled_model_dir):
    """The Slicer module lists models before torch is installed; the window check must not need it."""
    import subprocess
    import sys

    code = f"import sys; from medseg.models import read_card; read_card(r'{bundled_model_dir}'); "
    code += "print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False"]


def _only_root(monkeypatch, *roots):
    monkeypatch.setenv("MEDSEG_MODEL_PATH", os.pathsep.join(str(r) for r in roots))
    monkeypatch.setenv("MEDSEG_HOME", str(roots[0].parent / "home"))


def test_a_folder_in_the_working_directory_does_not_shadow_a_model_id(monkeypatch, tmp_path, bundled_model_dir):
    """``medseg segment ... -m hippocampus-mri`` run where an earlier output folder has that name."""
    monkeypatch.delenv("MEDSEG_MODEL_PATH", raising=False)
    monkeypatch.setenv("MEDSEG_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hippocampus-mri").mkdir()
    (tmp_path / "hippocampus-mri" / "case_001.nii.gz").write_bytes(b"an earlier result")
    assert find_model_folder("hippocampus-mri").resolve() == bundled_model_dir.resolve()
    # a path says so: a separator, a leading "." or "~", or a folder that holds a card
    assert find_model_folder("./hippocampus-mri") == Path("hippocampus-mri")
    assert find_model_folder(f"hippocampus-mri{os.sep}") == Path("hippocampus-mri")
    write_model_folder(tmp_path / "my-model")
    assert find_model_folder("my-model") == Path("my-model")
    with pytest.raises(ModelNotFoundError, match=r"model folder \./elsewhere does not exist"):
        find_model_folder("./elsewhere")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert find_model_folder("~/my-model") == tmp_path / "my-model"


def test_two_folders_giving_one_id_in_one_search_folder_are_refused_naming_both(monkeypatch, tmp_path):
    root = tmp_path / "models"
    write_model_folder(root / "a-model", id="twice", version="1.0")
    write_model_folder(root / "b-model", id="twice", version="2.0")
    write_model_folder(root / "c-model", id="once")
    _only_root(monkeypatch, root)
    with pytest.raises(
        ModelCardError, match=r"b-model.model\.json: field 'id' is 'twice', like .*a-model.model\.json; two"
    ):
        find_model_folder("twice")
    assert find_model_folder("once") == root / "c-model", "the other ids of that folder are unaffected"
    # the same id in two search folders is the search order at work: the first wins
    other = tmp_path / "other"
    write_model_folder(other / "z-model", id="once", version="9.9")
    _only_root(monkeypatch, other, root)
    assert find_model_folder("once") == other / "z-model"


def test_a_broken_card_named_after_the_id_is_reported_not_passed_over(monkeypatch, tmp_path):
    """A newer model with a damaged card must not be silently replaced by an older one further down the path."""
    newer, older = tmp_path / "newer", tmp_path / "older"
    write_model_folder(older / "tiny-test", version="1.0")
    broken = write_model_folder(newer / "tiny-test", version="2.0")
    edit_card(broken, lambda d: d.pop("labels"))
    _only_root(monkeypatch, newer, older)
    with pytest.raises(ModelCardError, match=r"newer.tiny-test.model\.json: missing field 'labels'"):
        find_model_folder("tiny-test")
    (newer / "tiny-test").rename(newer / "something-else")  # a broken card elsewhere says nothing about this id
    assert find_model_folder("tiny-test") == older / "tiny-test"


def test_an_unreadable_card_is_one_broken_entry_not_a_failure_of_every_lookup(monkeypatch, tmp_path, bundled_model_dir):
    root = tmp_path / "models"
    card = write_model_folder(root / "locked") / "model.json"
    card.chmod(0)
    if os.access(card, os.R_OK):  # root reads any file: take a real file that cannot be read by anyone
        if not Path("/proc/self/clear_refs").is_file():
            pytest.skip("needs an unreadable file: run as another user than root, or on Linux")
        card.unlink()
        card.symlink_to("/proc/self/clear_refs")
    _only_root(monkeypatch, root)
    try:
        with pytest.raises(ModelCardError, match=r"locked.model\.json: cannot be read \("):
            load_model_folder(root / "locked")
        entries = {e.folder.name: e for e in list_models()}
        assert entries["locked"].card is None and "cannot be read" in entries["locked"].problem
        assert find_model_folder("hippocampus-mri").resolve() == bundled_model_dir.resolve()
    finally:
        if not card.is_symlink():
            card.chmod(0o644)
