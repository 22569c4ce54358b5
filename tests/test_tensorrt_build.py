"""TensorRT building: pure parts everywhere, a clear capability error without TensorRT, a real build on GPUs."""

from __future__ import annotations

import sys

import numpy as np
import onnxruntime as ort
import pytest

from export_lib import tensorrt_build as trtb
from export_lib.results import CapabilityMissingError, ExitCode
from tests._engine_helpers import digits_spec, encoder_spec, spec_of


def test_profile_shapes_from_min_opt_max(tmp_path):
    spec = spec_of(encoder_spec(tmp_path))
    shapes = trtb.profile_shapes(spec)
    assert shapes == {"input_ids": ([1, 4], [4, 12], [16, 32]), "attention_mask": ([1, 4], [4, 12], [16, 32])}
    static = spec_of(digits_spec(tmp_path, inputs=[{"name": "pixels", "shape": [1, 1, 8, 8]}]))
    assert trtb.profile_shapes(static) == {"pixels": ([1, 1, 8, 8],) * 3}


def test_builder_flags_and_sources():
    assert trtb.builder_flags("tensorrt-fp16") == {"fp16": True, "int8": False}
    assert trtb.builder_flags("tensorrt-int8") == {"fp16": True, "int8": True}  # explicit QDQ: no calibrator
    assert trtb.source_variant("tensorrt-int8") == "onnx-int8"
    assert trtb.source_variant("tensorrt-fp16") == "onnx-fp32"
    with pytest.raises(ValueError, match="not a TensorRT variant"):
        trtb.builder_flags("onnx-int8")


def test_workspace_bytes():
    gib = trtb.GIB
    assert trtb.workspace_bytes(None) == 4 * gib
    assert trtb.workspace_bytes(80 * gib) == 4 * gib  # capped
    assert trtb.workspace_bytes(4 * gib) == 2 * gib  # half
    assert trtb.workspace_bytes(256 << 20) == 256 << 20  # floor


def test_missing_tensorrt_is_a_capability_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ImportError
    with pytest.raises(CapabilityMissingError) as e:
        trtb.require_tensorrt()
    assert e.value.exit_code == ExitCode.CAPABILITY_MISSING
    assert "TensorRT is not installed" in str(e.value) and "pypi.nvidia.com" in str(e.value)
    assert "--variants onnx-fp32,onnx-int8" in str(e.value)
    with pytest.raises(CapabilityMissingError):
        trtb.build_engine(tmp_path / "model.onnx", spec_of(digits_spec(tmp_path)), "tensorrt-fp16",
                          tmp_path / "model.plan")


@pytest.mark.gpu
def test_fp16_engine_matches_onnxruntime(tmp_path):
    from export_lib import convert, modelload, sampledata
    from model_zoo.digits import train_digits

    model, _, arrays = train_digits(epochs=2, seed=0)
    spec = spec_of(digits_spec(tmp_path / "ckpt", variants=["onnx-fp32", "tensorrt-fp16"]))
    ckpt = modelload.save_checkpoint(model, tmp_path / "ckpt" / "model.safetensors")
    result = convert.convert(spec, ckpt, tmp_path / "work")
    plan = tmp_path / "work" / "tensorrt-fp16" / "model.plan"
    assert plan.is_file() and result["variants"]["tensorrt-fp16"]["flags"]["fp16"]
    sess = ort.InferenceSession(result["onnx_path"], providers=["CPUExecutionProvider"])
    for batch in (1, 5, 32):  # min, an odd size, max of the profile
        x = sampledata.generate_inputs(spec, batch=batch, seed=batch)
        ref = sess.run(None, x)[0]
        got = trtb.run_engine(plan, x)["logits"]
        err = np.abs(got.astype(np.float64) - ref)
        assert not ((err > 1e-2) & (err > 1e-2 * np.abs(ref))).any(), float(err.max())
    x = {"pixels": arrays["pixels"][:32]}
    assert (trtb.run_engine(plan, x)["logits"].argmax(1) == sess.run(None, x)[0].argmax(1)).mean() > 0.95
