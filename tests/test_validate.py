"""validate on a real tiny CNN: a faithful export passes; a tampered ONNX file fails with exit 3 naming the output."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from validate_helpers import MODEL, build_workdir, quantize, tamper

from export_lib.config import load_config
from export_lib.results import BadInputError, CapabilityMissingError, ExitCode, ValidationFailedError, read_json
from export_lib.validate import build_cases, default_other_batch, validate
from export_lib.workdir import report_path, variant_model_path


def _cli(config, workdir, *extra):
    return subprocess.run([sys.executable, "-m", "export_lib", "validate", "--config", str(config), "--model", MODEL,
                           "--workdir", str(workdir), *extra], capture_output=True, text=True, timeout=300)


def test_faithful_export_passes_with_int8_accuracy_and_gx(tmp_path):
    config, workdir = build_workdir(tmp_path, ["onnx-fp32", "onnx-int8"])
    spec = load_config(config).model(MODEL)
    result = validate(spec, workdir)
    assert result["passed"]
    report = read_json(report_path(workdir, "validation"))
    assert report["passed"] and report["failures"] == []
    # The opt batch (4) and a different one (3) were both checked.
    assert {c["name"] for c in report["cases"]} == {"opt", "batch=3"}
    row = report["variants"]["onnx-fp32"]["outputs"]["logits"]
    assert row["passed"] and row["mismatch_fraction"] == 0.0 and row["max_abs_err"] < 1e-4
    assert row["cases"]["batch=3"]["shape"] == [3, 10]
    int8 = report["variants"]["onnx-int8"]
    assert int8["accuracy"]["gated"] and int8["accuracy"]["value"] >= 0.5
    assert report["accuracy"]["values"]["torch-eager"] == 1.0
    gx = read_json(report_path(workdir, "gx_result"))
    assert gx["success"] and gx["statistics"]["evaluated"] >= 5
    assert any(r["variant"] == "onnx-int8" and r["column"] == "accuracy" for r in gx["results"])


def test_tampered_onnx_fails_with_exit_3_naming_the_output(tmp_path):
    config, workdir = build_workdir(tmp_path)
    tamper(variant_model_path(workdir, "onnx-fp32"))
    proc = _cli(config, workdir)
    assert proc.returncode == ExitCode.VALIDATION_FAILED, proc.stderr
    assert "onnx-fp32 output 'logits'" in proc.stderr and "exceed atol=0.0001 AND rtol=0.001" in proc.stderr
    result = json.loads((workdir / "results" / "validate.json").read_text())
    assert result["status"] == "failed" and result["exit_code"] == 3
    report = read_json(report_path(workdir, "validation"))
    assert not report["passed"] and not report["variants"]["onnx-fp32"]["passed"]
    gx = read_json(report_path(workdir, "gx_result"))
    assert not gx["success"]
    failed = [r for r in gx["results"] if not r["success"]]
    assert any(r["column"] == "mismatch_fraction" and r["variant"] == "onnx-fp32" for r in failed)


def test_missing_variant_names_the_step_to_run(tmp_path):
    config, workdir = build_workdir(tmp_path, ["onnx-fp32", "onnx-int8"], built=["onnx-fp32"])
    spec = load_config(config).model(MODEL)
    with pytest.raises(BadInputError, match=r"onnx-int8.*run `calibrate`"):
        validate(spec, workdir)


def test_cases_cover_extra_dims_and_reject_out_of_range(tmp_path):
    config, _ = build_workdir(tmp_path, validation={"samples": 5, "extra_dims": {"batch": [1, 16]}})
    spec = load_config(config).model(MODEL)
    cases = build_cases(spec, None)
    assert [(c.name, c.samples) for c in cases] == [("opt", 5), ("batch=1", 1), ("batch=16", 16)]
    assert default_other_batch(spec) == 3
    bad = spec.model_copy(update={"validation": spec.validation.model_copy(update={"extra_dims": {"batch": [32]}})})
    with pytest.raises(BadInputError, match=r"extra_dims.batch has 32, outside"):
        build_cases(bad, None)


def test_failure_error_carries_the_figures(tmp_path):
    config, workdir = build_workdir(tmp_path)
    tamper(variant_model_path(workdir, "onnx-fp32"), factor=-1.0)
    spec = load_config(config).model(MODEL)
    with pytest.raises(ValidationFailedError, match=r"max abs err .*max rel err") as err:
        validate(spec, workdir)
    assert err.value.details["variants"]["onnx-fp32"]["passed"] is False


def test_tensorrt_variant_without_tensorrt_is_capability_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails here, also where TensorRT is installed
    config, workdir = build_workdir(tmp_path, ["onnx-fp32", "tensorrt-fp16"], built=["onnx-fp32"])
    plan = variant_model_path(workdir, "tensorrt-fp16")
    plan.parent.mkdir(parents=True)
    plan.write_bytes(b"not built here")
    with pytest.raises(CapabilityMissingError, match="TensorRT is not importable"):
        validate(load_config(config).model(MODEL), workdir)


@pytest.mark.gpu
def test_tensorrt_fp16_engine_validates(tmp_path):
    from export_lib import tensorrt_build

    config, workdir = build_workdir(tmp_path, ["onnx-fp32", "tensorrt-fp16"], built=["onnx-fp32"])
    spec = load_config(config).model(MODEL)
    plan = variant_model_path(workdir, "tensorrt-fp16")
    plan.parent.mkdir(parents=True)
    tensorrt_build.build_engine(variant_model_path(workdir, "onnx-fp32"), spec, "tensorrt-fp16", plan)
    assert validate(spec, workdir)["passed"]
    report = read_json(report_path(workdir, "validation"))
    assert report["variants"]["tensorrt-fp16"]["runner"]["provider"] == "TensorRT"
    assert report["variants"]["tensorrt-fp16"]["outputs"]["logits"]["cases"]["batch=3"]["shape"] == [3, 10]


def _broken_int8(workdir):
    """Re-quantize from an FP32 copy whose last Gemm weight is negated: the INT8 logits flip, accuracy collapses."""
    bad = workdir / "bad-fp32.onnx"
    shutil.copy(variant_model_path(workdir, "onnx-fp32"), bad)
    tamper(bad, factor=-3.0)
    quantize(bad, variant_model_path(workdir, "onnx-int8"))


def test_optional_variant_failure_is_recorded_and_not_selected(tmp_path):
    """validation.optional_variants: a drifting INT8 is rejected, FP32 still validates and is the one selected."""
    from export_lib.select import select_variant

    config, workdir = build_workdir(tmp_path, ["onnx-fp32", "onnx-int8"],
                                    validation={"samples": 8, "optional_variants": ["onnx-int8"]})
    _broken_int8(workdir)
    spec = load_config(config).model(MODEL)
    result = validate(spec, workdir)
    assert result["passed"] and result["rejected_optional"] == ["onnx-int8"]
    report = read_json(report_path(workdir, "validation"))
    assert report["passed"] and report["failures"] == []
    assert not report["variants"]["onnx-int8"]["passed"]
    assert any("onnx-int8" in r for r in report["rejected_optional"]["onnx-int8"])
    bench = {"settings": {"batch_sizes": [4], "stability": 0.1},
             "results": {"onnx-fp32": {"4": {"p50_ms": 1.0}}, "onnx-int8": {"4": {"p50_ms": 0.1}}}}
    selection = select_variant(spec.variants, report, bench)
    assert selection["selected"] == "onnx-fp32"
    assert selection["decisions"]["onnx-int8"]["reason"].startswith("failed validation")


def test_same_int8_failure_is_fatal_when_not_optional(tmp_path):
    config, workdir = build_workdir(tmp_path, ["onnx-fp32", "onnx-int8"])
    _broken_int8(workdir)
    with pytest.raises(ValidationFailedError, match="onnx-int8"):
        validate(load_config(config).model(MODEL), workdir)


def test_eval_data_without_labels_or_samples_is_bad_input(tmp_path):
    """top1_accuracy on an .npz without `labels`, an .npz holding zero samples or NaN inputs, labels that are not
    class indices: exit 2 naming the data and the fix (not an exit 1 crash, nor an exit 3 blaming the model)."""
    import numpy as np

    for name, arrays, message in (
        ("nolabels", {"pixels": np.zeros((6, 1, 8, 8), np.float32)}, "has no `labels` array"),
        ("empty", {"pixels": np.zeros((0, 1, 8, 8), np.float32), "labels": np.zeros(0, np.int64)},
         "holds no samples"),
        ("nan", {"pixels": np.full((6, 1, 8, 8), np.nan, np.float32), "labels": np.zeros(6, np.int64)},
         "holds 384 NaN/Inf value(s)"),
        ("labels", {"pixels": np.zeros((6, 1, 8, 8), np.float32), "labels": np.arange(6, dtype=np.int64) * 5},
         "labels range over [0, 25] but output 'logits' has 10 classes"),
    ):
        case = tmp_path / name
        case.mkdir()
        np.savez(case / "eval.npz", **arrays)
        config, workdir = build_workdir(case, accuracy={"metric": "top1_accuracy", "threshold": 0.5,
                                                        "eval_data": "eval.npz"})
        proc = _cli(config, workdir)
        assert proc.returncode == ExitCode.BAD_INPUT, proc.stderr
        names_the_data = str(case / "eval.npz") in proc.stderr or "accuracy.eval_data 'eval.npz'" in proc.stderr
        assert message in proc.stderr and names_the_data and "Traceback" not in proc.stderr
        assert not report_path(workdir, "validation").exists()
