"""Tiny real work directories for the validate/benchmark/select tests: a small DigitsCNN, its checkpoint, its
ONNX export (TorchScript exporter: ~0.2 s) and, on request, a QDQ INT8 model; built here so these tests do not
depend on the convert/calibrate steps."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
import yaml
from onnx import numpy_helper

from export_lib.config import load_config
from export_lib.modelload import save_checkpoint
from export_lib.workdir import checkpoint_path, variant_model_path
from model_zoo.digits import DigitsCNN

MODEL = "tiny-digits"


def write_config(tmp: Path, variants: list[str], **model_overrides) -> Path:
    model = {
        "name": MODEL,
        "factory": "model_zoo.digits:DigitsCNN",
        "factory_kwargs": {"channels": 4},
        "checkpoint": {"uri": str(tmp / "ckpt")},
        "inputs": [{"name": "pixels", "shape": ["batch", 1, 8, 8],
                    "dynamic": {"batch": {"min": 1, "opt": 4, "max": 16}}}],
        "outputs": ["logits"],
        "variants": variants,
        "accuracy": {"threshold": 0.5},
        "validation": {"samples": 8},
        "benchmark": {"batch_sizes": [1, 4], "warmup": 2, "window": 5, "max_windows": 4, "stability": 0.5},
        **model_overrides,
    }
    path = tmp / "export.yaml"
    path.write_text(yaml.safe_dump({"models": [model]}))
    return path


def build_workdir(tmp: Path, variants: list[str] = ("onnx-fp32",), built: list[str] | None = None,
                  **model_overrides) -> tuple[Path, Path]:
    """(config path, workdir) with the checkpoint and the artifacts of `built` (default: every variant)."""
    built = list(variants if built is None else built)
    config = write_config(tmp, list(variants), **model_overrides)
    spec = load_config(config).model(MODEL)
    workdir = tmp / "work"
    torch.manual_seed(0)
    model = DigitsCNN(channels=4).eval()
    save_checkpoint(model, checkpoint_path(workdir, spec))
    fp32 = variant_model_path(workdir, "onnx-fp32")
    fp32.parent.mkdir(parents=True)
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (torch.randn(2, 1, 8, 8),), str(fp32), input_names=["pixels"], output_names=["logits"],
                          dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17,
                          dynamo=False)
    if "onnx-int8" in built:
        quantize(fp32, variant_model_path(workdir, "onnx-int8"))
    return config, workdir


def quantize(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            self._it = iter([{"pixels": rng.normal(size=(4, 1, 8, 8)).astype(np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self._it, None)

    dst.parent.mkdir(parents=True, exist_ok=True)
    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)


def tamper(path: Path, factor: float = 1.5) -> str:
    """Scale the last Gemm's weight in place (outputs diverge, graph stays valid); returns the initializer name."""
    model = onnx.load(str(path))
    gemm = [n for n in model.graph.node if n.op_type == "Gemm"][-1]
    init = next(i for i in model.graph.initializer if i.name == gemm.input[1])
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * factor, init.name))
    onnx.save(model, str(path))
    return init.name
