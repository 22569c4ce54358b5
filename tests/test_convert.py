"""convert: ONNX export with dynamic axes, fallback, self-contained artifacts, and clean failures (CLI too)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export_lib import convert as conv
from export_lib import modelload, sampledata
from export_lib.artifacts import staged_dir
from export_lib.results import ExitCode
from model_zoo.digits import DigitsCNN
from model_zoo.encoder import TinyEncoder
from tests._engine_helpers import digits_spec, encoder_spec, run_cli, spec_of, write_config, write_module

QUIRKY = """
    import torch

    class DataDependent(torch.nn.Module):
        '''A branch on tensor values: torch.export (dynamo) refuses it, TorchScript tracing records one branch.'''
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)
        def forward(self, features):
            if features.mean() > 100:
                features = features * 0
            return self.fc(features)

    class BatchSpecialising(torch.nn.Module):
        '''Dynamo specialises the batch to the example's 2 (and says nothing); tracing keeps it symbolic.'''
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)
        def forward(self, features):
            y = self.fc(features)
            return y * 2 if y.shape[0] != 2 else y + y
"""


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _quirky_spec(tmp_path: Path, factory: str) -> dict:
    return digits_spec(tmp_path / "ckpt", name="quirky", factory=f"quirky_models:{factory}",
                       inputs=[{"name": "features", "shape": ["batch", 4],
                                "dynamic": {"batch": {"min": 1, "opt": 4, "max": 16}}}],
                       outputs=["scores"])


@pytest.fixture
def quirky(tmp_path, monkeypatch):
    write_module(tmp_path / "user", "quirky_models", QUIRKY)
    monkeypatch.syspath_prepend(str(tmp_path / "user"))
    yield tmp_path / "user"
    sys.modules.pop("quirky_models", None)


# ------------------------------------------------------------------------------------------- pure helpers
def test_example_and_check_dims(tmp_path):
    spec = spec_of(encoder_spec(tmp_path))
    ex = conv.example_dims(spec)
    assert ex == {"batch": 2, "seq": 12}
    other = conv.check_dims(spec, ex)
    assert other["batch"] != 2 and other["seq"] != 12
    narrow = spec_of(digits_spec(tmp_path, inputs=[{"name": "pixels", "shape": ["batch", 1, 8, 8],
                                                    "dynamic": {"batch": {"min": 1, "opt": 1, "max": 1}}}]))
    assert conv.example_dims(narrow) == {"batch": 1} and conv.check_dims(narrow, {"batch": 1}) == {"batch": 1}


def test_specialised_dims_are_detected(tmp_path):
    spec = spec_of(digits_spec(tmp_path))
    x = onnx.helper.make_tensor_value_info("pixels", onnx.TensorProto.FLOAT, [2, 1, 8, 8])
    y = onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [2, 64])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Flatten", ["pixels"], ["logits"])], "g", [x], [y])
    problems = conv.specialised_dims(onnx.helper.make_model(graph), spec)
    assert problems == ["input 'pixels' axis 0 ('batch') was specialised to 2"]


def test_staged_dir_leaves_nothing_on_failure(tmp_path):
    final = tmp_path / "onnx-fp32"
    with staged_dir(final) as d:
        (d / "model.onnx").write_text("v1")
    with pytest.raises(RuntimeError), staged_dir(final) as d:
        (d / "model.onnx").write_text("partial")
        raise RuntimeError("boom")
    assert (final / "model.onnx").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx-fp32"]


# ------------------------------------------------------------------------------------------- exports
def test_convert_digits_in_process(tmp_path):
    spec = spec_of(digits_spec(tmp_path / "ckpt"))
    model = DigitsCNN().eval()
    ckpt = modelload.save_checkpoint(model, tmp_path / "ckpt" / "model.safetensors")
    result = conv.convert(spec, ckpt, tmp_path / "work")
    path = Path(result["onnx_path"])
    assert result["exporter"] == "dynamo" and result["fallback_reason"] is None
    assert result["inputs"] == {"pixels": ["batch", 1, 8, 8]} and result["opset"] == 20
    assert result["dynamic_check"]["dims"]["batch"] != 2
    assert {"torch", "onnx", "onnxruntime"} <= set(result["library_versions"])
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx"]
    sess = _session(path)
    for batch in (1, 5, 32):  # none is the export example's 2
        x = sampledata.generate_inputs(spec, batch=batch, seed=batch)
        np.testing.assert_allclose(sess.run(None, x)[0], modelload.forward(model, spec, x)["logits"],
                                   rtol=1e-4, atol=1e-5)


def test_convert_encoder_through_cli(tmp_path):
    spec_dict = encoder_spec(tmp_path / "ckpt")
    model = TinyEncoder(vocab=50, max_len=32).eval()
    (tmp_path / "ckpt").mkdir()
    torch.save(model.state_dict(), tmp_path / "ckpt" / "model.pt")
    config = write_config(tmp_path / "export.yaml", spec_dict)
    work = tmp_path / "work"
    shutil.copytree(tmp_path / "ckpt", work / "checkpoint")  # the default checkpoint location (as sync leaves it)
    code, result, stderr = run_cli("convert", config, "tiny-encoder", work)
    assert code == ExitCode.OK, stderr
    assert result["inputs"] == {"input_ids": ["batch", "seq"], "attention_mask": ["batch", "seq"]}
    assert (work / "results" / "convert.json").is_file()
    # The directory is movable as a unit.
    moved = shutil.move(str(work / "onnx-fp32"), str(tmp_path / "elsewhere"))
    spec = spec_of(spec_dict)
    x = sampledata.generate_inputs(spec, batch=3, seed=1, dims={"seq": 9})
    x["attention_mask"][:, 6:] = 0  # padding
    np.testing.assert_allclose(_session(Path(moved) / "model.onnx").run(None, x)[0],
                               modelload.forward(model, spec, x)["logits"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("factory,reason", [("DataDependent", "TorchExportError"),
                                            ("BatchSpecialising", "specialised")])
def test_fallback_to_torchscript(tmp_path, quirky, factory, reason):
    spec = spec_of(_quirky_spec(tmp_path, factory))
    model = modelload.instantiate(spec).eval()
    ckpt = modelload.save_checkpoint(model, tmp_path / "ckpt" / "model.safetensors")
    result = conv.convert(spec, ckpt, tmp_path / "work")
    assert result["exporter"] == "torchscript"
    assert reason in result["fallback_reason"]
    sess = _session(Path(result["onnx_path"]))
    x = sampledata.generate_inputs(spec, batch=7)
    np.testing.assert_allclose(sess.run(None, x)[0], modelload.forward(model, spec, x)["scores"], rtol=1e-5,
                               atol=1e-6)


def test_large_models_keep_external_data_beside_the_model(tmp_path, monkeypatch):
    monkeypatch.setattr(conv, "SINGLE_FILE_LIMIT", 0)
    spec = spec_of(digits_spec(tmp_path / "ckpt"))
    ckpt = modelload.save_checkpoint(DigitsCNN(), tmp_path / "ckpt" / "model.safetensors")
    result = conv.convert(spec, ckpt, tmp_path / "work")
    assert set(result["variants"]["onnx-fp32"]["files"]) == {"model.onnx", "model.onnx.data"}
    moved = Path(shutil.move(str(tmp_path / "work" / "onnx-fp32"), str(tmp_path / "moved")))
    model = onnx.load(str(moved / "model.onnx"), load_external_data=False)
    locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"model.onnx.data"}
    assert _session(moved / "model.onnx").run(None, sampledata.generate_inputs(spec, batch=3))[0].shape == (3, 10)


# ------------------------------------------------------------------------------------------- failures (CLI)
def _bad_checkpoint(kind: str, ckpt: Path, tmp_path: Path) -> None:
    if kind == "truncated":
        data = (ckpt / "model.safetensors").read_bytes()
        (ckpt / "model.safetensors").write_bytes(data[: len(data) // 3])
    elif kind == "wrong-architecture":
        modelload.save_checkpoint(DigitsCNN(num_classes=7), ckpt / "model.safetensors")


@pytest.mark.parametrize("kind,message", [
    ("truncated", "truncated or corrupt"),
    ("wrong-architecture", "shape mismatches (2): head.bias: checkpoint [7] vs model [10]"),
    ("pickled-code", "pickled objects other than tensors"),
    ("unknown-field", "models.0.inputs.0.layout: unknown field"),
    ("shape-not-fitting", "input spec of model 'digits-cnn' does not fit the model"),
])
def test_bad_inputs_exit_2_without_partial_output(tmp_path, kind, message):
    ckpt = tmp_path / "ckpt"
    modelload.save_checkpoint(DigitsCNN(), ckpt / "model.safetensors")
    spec = digits_spec(ckpt)
    marker = tmp_path / "code-ran"
    if kind in ("truncated", "wrong-architecture"):
        _bad_checkpoint(kind, ckpt, tmp_path)
    elif kind == "pickled-code":
        from tests.test_modelload import _PlantsMarker

        torch.save({"w": torch.zeros(1), "x": _PlantsMarker(marker)}, ckpt / "model.pt")
        spec["checkpoint"] = {"uri": str(ckpt), "filename": "model.pt", "format": "state_dict"}
    elif kind == "unknown-field":
        spec["inputs"][0]["layout"] = "NCHW"
    elif kind == "shape-not-fitting":
        spec["inputs"][0]["shape"] = ["batch", 3, 8, 8]
    config = write_config(tmp_path / "export.yaml", spec)
    work = tmp_path / "work"
    code, result, stderr = run_cli("convert", config, "digits-cnn", work, "--checkpoint",
                                   str(ckpt / spec["checkpoint"]["filename"]))
    assert code == ExitCode.BAD_INPUT, stderr
    assert message in result["error"], result["error"]
    if kind == "shape-not-fitting":
        assert "pixels [2, 3, 8, 8] float32" in result["error"]
    assert not (work / "onnx-fp32").exists()
    assert not any(p.name.startswith(".") for p in work.glob("*")) if work.exists() else True
    assert not marker.exists()


def test_tensorrt_variant_without_tensorrt_exits_4_before_any_work(tmp_path):
    ckpt = tmp_path / "ckpt"
    modelload.save_checkpoint(DigitsCNN(), ckpt / "model.safetensors")
    config = write_config(tmp_path / "export.yaml",
                          digits_spec(ckpt, variants=["onnx-fp32", "tensorrt-fp16"]))
    work = tmp_path / "work"
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    code, result, _ = run_cli("convert", config, "digits-cnn", work, "--checkpoint", str(ckpt / "model.safetensors"))
    assert code == ExitCode.CAPABILITY_MISSING
    assert "TensorRT is not installed" in result["error"] and "pypi.nvidia.com" in result["error"]
    assert not (work / "onnx-fp32").exists()
    code, result, _ = run_cli("convert", config, "digits-cnn", work, "--checkpoint", str(ckpt / "model.safetensors"),
                              "--variants", "onnx-fp32")
    assert code == ExitCode.OK and (work / "onnx-fp32" / "model.onnx").is_file()


def test_staging_leftovers_of_killed_runs_are_cleaned_but_fresh_ones_are_kept(tmp_path):
    """A killed step leaves `.onnx-fp32.tmp-*`; the next write removes it once stale, never a live writer's."""
    import os
    import time

    from export_lib.artifacts import STALE_AFTER_S, staged_dir

    final = tmp_path / "onnx-fp32"
    stale, fresh = tmp_path / ".onnx-fp32.tmp-dead", tmp_path / ".onnx-fp32.tmp-live"
    for d in (stale, fresh):
        (d / ".raw-x").mkdir(parents=True)
        (d / ".raw-x" / "model.onnx.data").write_bytes(b"\0" * 1024)
    old = time.time() - STALE_AFTER_S - 60
    os.utime(stale, (old, old))
    with staged_dir(final) as tmp:
        (tmp / "model.onnx").write_bytes(b"onnx")
    assert (final / "model.onnx").read_bytes() == b"onnx"
    assert not stale.exists(), "a stale staging dir of a killed run must be removed"
    assert fresh.exists(), "a recent staging dir may belong to a live writer and must be kept"
