"""Model loading (factories, safe and strict checkpoints) and sample data."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from export_lib import modelload, sampledata
from export_lib.results import BadInputError
from model_zoo.digits import DigitsCNN, train_digits
from model_zoo.encoder import TinyEncoder
from tests._engine_helpers import digits_spec, encoder_spec, spec_of, write_module


class _PlantsMarker:
    """Unpickling this would create a file: proof that the checkpoint's code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def digits(tmp_path):
    spec = spec_of(digits_spec(tmp_path / "ckpt"))
    model = DigitsCNN().eval()
    path = modelload.save_checkpoint(model, tmp_path / "ckpt" / "model.safetensors")
    return spec, model, path


def test_safetensors_round_trip(digits):
    spec, model, path = digits
    loaded = modelload.build_model(spec, path)
    assert not loaded.training
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_state_dict_and_wrapped_training_checkpoint(tmp_path):
    spec = spec_of(encoder_spec(tmp_path))
    model = TinyEncoder(vocab=50, max_len=32).eval()
    torch.save({"model": model.state_dict(), "step": 7, "lr": 0.1}, tmp_path / "model.pt")
    loaded = modelload.build_model(spec, tmp_path / "model.pt")
    inputs = sampledata.generate_inputs(spec, batch=2, seed=3)
    np.testing.assert_allclose(modelload.forward(loaded, spec, inputs)["logits"],
                               modelload.forward(model, spec, inputs)["logits"])


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("raw_pickle", [False, True], ids=["torch-zip", "raw-pickle"])
def test_pickled_code_is_refused_and_never_runs(tmp_path, raw_pickle):
    marker = tmp_path / "code-ran"
    payload = {"weight": torch.zeros(2), "evil": _PlantsMarker(marker)}
    path = tmp_path / "model.pt"
    if raw_pickle:
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path)
    spec = spec_of(digits_spec(tmp_path, checkpoint={"uri": str(tmp_path), "filename": "model.pt",
                                                     "format": "state_dict"}))
    with pytest.raises(BadInputError, match="pickled objects other than tensors") as e:
        modelload.build_model(spec, path)
    assert str(path) in str(e.value)
    assert not marker.exists()


@pytest.mark.parametrize("fmt", ["safetensors", "state_dict"])
def test_truncated_checkpoint_names_the_file(tmp_path, fmt):
    path = modelload.save_checkpoint(DigitsCNN(), tmp_path / "model.bin", fmt)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    spec = spec_of(digits_spec(tmp_path, checkpoint={"uri": str(tmp_path), "filename": "model.bin", "format": fmt}))
    with pytest.raises(BadInputError, match="truncated or corrupt") as e:
        modelload.build_model(spec, path)
    assert str(path) in str(e.value)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(BadInputError, match="does not exist"):
        modelload.build_model(spec_of(digits_spec(tmp_path)), tmp_path / "nope.safetensors")


def test_wrong_architecture_names_shapes_and_keys(tmp_path):
    spec = spec_of(digits_spec(tmp_path))
    path = modelload.save_checkpoint(DigitsCNN(channels=8), tmp_path / "narrow.safetensors")
    with pytest.raises(BadInputError, match=r"shape mismatches \(21\): .*block.conv1.weight: checkpoint \[8, 8, 3, 3\] "
                                            r"vs model \[16, 16, 3, 3\]"):
        modelload.build_model(spec, path)
    path = modelload.save_checkpoint(TinyEncoder(vocab=50), tmp_path / "enc.safetensors")
    with pytest.raises(BadInputError) as e:
        modelload.build_model(spec, path)
    assert "missing keys (" in str(e.value) and "stem.0.weight" in e.value.details["missing"]
    assert "unexpected keys (" in str(e.value) and "tok.weight" in e.value.details["unexpected"]
    assert any("head.weight" in m for m in e.value.details["shape_mismatches"])


def test_bad_factory_path_is_named(tmp_path):
    spec = spec_of(digits_spec(tmp_path, factory="no_such_pkg.models:Net"))
    with pytest.raises(BadInputError, match="cannot import model factory 'no_such_pkg.models:Net'.*PYTHONPATH"):
        modelload.instantiate(spec)
    spec = spec_of(digits_spec(tmp_path, factory="model_zoo.digits:Nope"))
    with pytest.raises(BadInputError, match="has no attribute 'Nope'"):
        modelload.instantiate(spec)
    spec = spec_of(digits_spec(tmp_path, factory_kwargs={"colour": True}))
    with pytest.raises(BadInputError, match="rejected factory_kwargs"):
        modelload.instantiate(spec)


def test_factory_that_raises_is_bad_input_naming_factory_and_line(tmp_path):
    """A factory rejecting its kwargs with its own check (ValueError, ...) or a module failing at import is the
    config's/user code's problem: exit 2 with the factory, the error and where it was raised, not a traceback."""
    from tests._engine_helpers import run_cli, write_config

    write_module(tmp_path / "mods", "picky_models", """
        def build(width=3):
            if width % 2:
                raise ValueError("width must be even")
    """)
    write_module(tmp_path / "mods", "broken_models", "x = 1 / 0\n")
    ckpt = modelload.save_checkpoint(DigitsCNN(), tmp_path / "model.safetensors")
    config = write_config(tmp_path / "export.yaml", digits_spec(tmp_path, factory="picky_models:build"))
    code, result, stderr = run_cli("convert", config, "digits-cnn", tmp_path / "work", "--checkpoint", str(ckpt),
                                   pythonpath=[tmp_path / "mods"])
    assert code == 2, stderr
    assert "model factory 'picky_models:build' raised ValueError: width must be even" in result["error"]
    assert "picky_models.py:4" in result["error"] and "factory_kwargs" in result["error"]
    assert "Traceback" not in stderr and not (tmp_path / "work" / "onnx-fp32").exists()

    config = write_config(tmp_path / "export.yaml", digits_spec(tmp_path, factory="broken_models:Net"))
    code, result, stderr = run_cli("convert", config, "digits-cnn", tmp_path / "work", "--checkpoint", str(ckpt),
                                   pythonpath=[tmp_path / "mods"])
    assert code == 2, stderr
    assert "'broken_models:Net' failed: ZeroDivisionError" in result["error"]
    assert "broken_models.py:1" in result["error"]


def test_newcomers_own_model_from_pythonpath(tmp_path, monkeypatch):
    write_module(tmp_path / "mine", "acme_models", """
        import torch
        class Mlp(torch.nn.Module):
            def __init__(self, width=8):
                super().__init__()
                self.fc = torch.nn.Linear(4, width)
            def forward(self, features):
                return torch.relu(self.fc(features))
    """)
    monkeypatch.syspath_prepend(str(tmp_path / "mine"))
    spec = spec_of(digits_spec(tmp_path, name="acme-mlp", factory="acme_models:Mlp", factory_kwargs={"width": 5},
                               inputs=[{"name": "features", "shape": ["batch", 4],
                                        "dynamic": {"batch": {"min": 1, "opt": 2, "max": 8}}}],
                               outputs=["activations"]))
    model = modelload.instantiate(spec)
    path = modelload.save_checkpoint(model, tmp_path / "m.safetensors")
    out = modelload.forward(modelload.build_model(spec, path), spec, sampledata.generate_inputs(spec, batch=3))
    assert out["activations"].shape == (3, 5)
    sys.modules.pop("acme_models", None)


def test_train_digits_is_accurate():
    _, accuracy, arrays = train_digits(epochs=4, seed=0)
    assert accuracy > 0.9
    assert arrays["pixels"].shape[1:] == (1, 8, 8) and arrays["pixels"].dtype == np.float32
    assert arrays["labels"].dtype == np.int64 and len(arrays["labels"]) == len(arrays["pixels"])


# ------------------------------------------------------------------------------------------- sample data
def test_generate_inputs_seeded_with_overrides(tmp_path):
    spec = spec_of(encoder_spec(tmp_path))
    a = sampledata.generate_inputs(spec, seed=5)
    b = sampledata.generate_inputs(spec, seed=5)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert a["input_ids"].shape == (4, 12) and a["input_ids"].dtype == np.int64  # opt sizes
    assert a["input_ids"].min() >= 0 and a["input_ids"].max() < 50
    assert (a["attention_mask"] == 1).all()
    c = sampledata.generate_inputs(spec, batch=3, seed=5, dims={"seq": 7})
    assert c["input_ids"].shape == c["attention_mask"].shape == (3, 7)
    batches = sampledata.generate_batches(spec, 10, 4, seed=1)
    assert [len(x["input_ids"]) for x in batches] == [4, 4, 2]
    torch_inputs = sampledata.to_torch(c)
    assert torch_inputs["input_ids"].dtype == torch.int64


def test_integer_input_needs_an_integer_sample_kind(tmp_path):
    spec_dict = encoder_spec(tmp_path)
    del spec_dict["inputs"][1]["sample"]
    with pytest.raises(BadInputError, match="'attention_mask' is int64 but sample.kind is 'normal'"):
        sampledata.generate_inputs(spec_of(spec_dict))


def test_static_batch_cannot_be_overridden(tmp_path):
    spec = spec_of(digits_spec(tmp_path, inputs=[{"name": "pixels", "shape": [1, 1, 8, 8]}]))
    with pytest.raises(BadInputError, match="static batch dim 1"):
        sampledata.generate_inputs(spec, batch=4)
    assert [len(b["pixels"]) for b in sampledata.generate_batches(spec, 3, 8, 0)] == [1, 1, 1]


def test_load_npz_checks_names_shapes_dtypes(tmp_path):
    spec = spec_of(digits_spec(tmp_path))
    good = tmp_path / "good.npz"
    np.savez(good, pixels=np.zeros((5, 1, 8, 8), np.float64), labels=np.arange(5))
    inputs, labels = sampledata.load_npz(good, spec)
    assert inputs["pixels"].dtype == np.float32 and labels.tolist() == [0, 1, 2, 3, 4]
    cases = {
        "missing": ({"image": np.zeros((5, 1, 8, 8), np.float32)}, "no array for input 'pixels'"),
        "shape": ({"pixels": np.zeros((5, 3, 8, 8), np.float32)}, r"axis 1: 3 != 1"),
        "rank": ({"pixels": np.zeros((5, 64), np.float32)}, "rank 2 vs 4"),
        "dtype": ({"pixels": np.zeros((5, 1, 8, 8), np.complex64)}, "dtype complex64"),
        "labels": ({"pixels": np.zeros((5, 1, 8, 8), np.float32), "labels": np.zeros(4)}, "`labels` must be"),
    }
    for name, (arrays, message) in cases.items():
        np.savez(tmp_path / f"{name}.npz", **arrays)
        with pytest.raises(BadInputError, match=message):
            sampledata.load_npz(tmp_path / f"{name}.npz", spec)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(BadInputError, match="not a readable .npz"):
        sampledata.load_npz(tmp_path / "junk.npz", spec)


def test_model_config_doc_examples_are_valid():
    """docs/model-config.md's YAML blocks parse (the full example as a config, the walkthrough entry as a model)."""
    import re

    import yaml

    from export_lib.config import parse_config

    text = (Path(__file__).resolve().parents[1] / "docs" / "model-config.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
    config = parse_config(yaml.safe_load(blocks[0]), "docs example")
    assert [m.name for m in config.models] == ["digits-cnn", "tiny-encoder"]
    entry = yaml.safe_load(blocks[1])[0]
    assert parse_config({"models": [entry]}).models[0].factory == "acme_models.ranker:Ranker"
