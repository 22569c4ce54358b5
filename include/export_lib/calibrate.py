"""calibrate: onnx-fp32 -> onnx-int8 (static QDQ with onnxruntime.quantization) [-> TensorRT INT8].

Calibration runs over *all* configured samples (seeded when generated). Tensors computed only from integer
inputs (an attention mask turned into an additive bias of 0 / -1e4 or finfo.min) are never quantized: one int8
scale cannot hold both the bias and the scores it is added to. Their consumer nodes go to `nodes_to_exclude`.
ORT's Entropy calibrator still histograms such tensors when their consumers' op types are calibrated, and fails
on finfo.min-sized ranges ("Too many bins"); that failure is reported as bad input naming the mask input and the
fix (take the op type out of calibration.op_types — the default Conv/MatMul/Gemm avoids it — or use minmax).
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    quant_pre_process,
    quantize_static,
)

from export_lib import tensorrt_build, workdir
from export_lib.artifacts import file_inventory, library_versions, remove_stale, staged_dir
from export_lib.config import ModelSpec
from export_lib.results import BadInputError
from export_lib.sampledata import batch_dim_name, generate_batches, generate_inputs, load_npz, split_batches

log = logging.getLogger(__name__)

METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
           "percentile": CalibrationMethod.Percentile}
_INT_TYPES = {onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.INT8, onnx.TensorProto.BOOL,
              onnx.TensorProto.UINT8, onnx.TensorProto.INT16}
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


class BatchReader(CalibrationDataReader):
    """Feeds prepared batches once, counting the samples it handed out."""

    def __init__(self, batches: Iterable[dict[str, np.ndarray]]):
        self._batches = list(batches)
        self._it = iter(self._batches)
        self.samples_fed = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._it, None)
        if batch is not None:
            self.samples_fed += len(next(iter(batch.values())))
        return batch

    def __len__(self) -> int:
        return len(self._batches)


# ------------------------------------------------------------------------------------------- data
def calibration_batches(spec: ModelSpec, data_path: Path | None) -> tuple[list[dict[str, np.ndarray]], str]:
    """The configured calibration samples in batches, and where they came from."""
    cal = spec.calibration
    if cal.data == "generated":
        return generate_batches(spec, cal.samples, cal.batch_size, cal.seed), f"generated (seed {cal.seed})"
    if data_path is None:
        raise BadInputError(f"calibration.data is '{cal.data}' but no local path was given for it")
    inputs, _ = load_npz(data_path, spec)
    n = len(next(iter(inputs.values())))
    if n < cal.samples:
        log.warning("%s holds %d samples, calibration.samples is %d: calibrating on all %d", data_path, n,
                    cal.samples, n)
    # A static batch dim fixes the batch size whatever calibration.batch_size says.
    size = cal.batch_size if batch_dim_name(spec) else int(spec.inputs[0].shape[0])
    batches = split_batches(inputs, size, limit=cal.samples)
    if any(len(next(iter(b.values()))) != size for b in batches) and not batch_dim_name(spec):
        batches = batches[:-1]  # a static batch cannot take a short last batch
    if not batches:
        raise BadInputError(f"calibration data '{data_path}' has no complete batch of {size} samples")
    return batches, str(data_path)


# ------------------------------------------------------------------------------------------- graph analysis
def _types(model: onnx.ModelProto) -> dict[str, int]:
    g = model.graph
    out = {vi.name: vi.type.tensor_type.elem_type for vi in [*g.input, *g.value_info, *g.output]}
    out.update({t.name: t.data_type for t in g.initializer})
    return out


def mask_derived(model: onnx.ModelProto) -> tuple[dict[str, str], list[str]]:
    """Float tensors computed only from integer graph inputs (and constants) -> the integer input they come from,
    and the names of the nodes that consume them.

    An embedding lookup (Gather on a float initializer) is an activation, not a mask: it stops the propagation.
    The model must carry shape-inferred types (value_info).
    """
    types = _types(model)
    const = {t.name for t in model.graph.initializer}
    origin: dict[str, str] = {i.name: i.name for i in model.graph.input
                              if i.type.tensor_type.elem_type in _INT_TYPES and i.name not in const}
    for node in model.graph.node:
        ins = [i for i in node.input if i]
        if node.op_type == "Constant" or (ins and all(i in const for i in ins)):
            const.update(node.output)
            continue
        sources = [origin[i] for i in ins if i in origin]
        if not sources or not all(i in origin or i in const for i in ins):
            continue
        if node.op_type == "Gather" and types.get(node.input[0]) in _FLOAT_TYPES:
            continue
        for o in node.output:
            origin[o] = sources[0]
    masks = {t: src for t, src in origin.items() if types.get(t) in _FLOAT_TYPES}
    consumers = [n.name for n in model.graph.node if any(i in masks for i in n.input)]
    return masks, consumers


def calibrated_mask_tensors(model: onnx.ModelProto, masks: dict[str, str], op_types: list[str]) -> dict[str, str]:
    """Mask tensors ORT's calibrator will collect (inputs/outputs of nodes of the calibrated op types)."""
    hit = {}
    for node in model.graph.node:
        if op_types and node.op_type not in op_types:
            continue
        for t in (*node.input, *node.output):
            if t in masks:
                hit[t] = f"{masks[t]} -> {node.op_type} '{node.name}'"
    return hit


def count_quantized(model: onnx.ModelProto, op_types: list[str]) -> dict[str, int]:
    """How many nodes of the quantized op types read a DequantizeLinear output (i.e. run in int8)."""
    dq_out = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    counts = {"QuantizeLinear": 0, "DequantizeLinear": 0}
    quantized = 0
    for n in model.graph.node:
        if n.op_type in counts:
            counts[n.op_type] += 1
        elif (not op_types or n.op_type in op_types) and any(i in dq_out for i in n.input):
            quantized += 1
    return {"nodes_quantized": quantized, "quantize_linear": counts["QuantizeLinear"],
            "dequantize_linear": counts["DequantizeLinear"]}


# ------------------------------------------------------------------------------------------- steps
def preprocess(src: Path, dst: Path) -> tuple[Path, str, list[str]]:
    """quant_pre_process, then without symbolic shape inference, then none; (model to quantize, mode, reasons)."""
    reasons: list[str] = []
    for mode, kwargs in (("full", {}), ("skip_symbolic_shape", {"skip_symbolic_shape": True})):
        try:
            quant_pre_process(str(src), str(dst), **kwargs)
            return dst, mode, reasons
        except Exception as e:
            reason = f"quant_pre_process ({mode}) failed: {type(e).__name__}: {str(e).strip()[:300]}"
            log.warning("%s; falling back", reason)
            reasons.append(reason)
            dst.unlink(missing_ok=True)
    log.warning("quantizing '%s' without preprocessing", src)
    return src, "none", reasons


def _with_types(path: Path) -> onnx.ModelProto:
    return onnx.shape_inference.infer_shapes(onnx.load(str(path)))


def quantize(spec: ModelSpec, src: Path, out: Path, batches: list[dict[str, np.ndarray]],
             scratch: Path, symmetric_activations: bool) -> dict[str, Any]:
    cal = spec.calibration
    model_in, mode, fallbacks = preprocess(src, scratch / "preprocessed.onnx")
    typed = _with_types(model_in)
    masks, excluded = mask_derived(typed)
    if excluded:
        log.info("not quantizing %d node(s) reading tensors derived from integer inputs %s", len(excluded),
                 sorted(set(masks.values())))
    reader = BatchReader(batches)
    external = (src.parent / (src.name + ".data")).exists()
    try:
        quantize_static(
            str(model_in), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=cal.per_channel,
            op_types_to_quantize=list(cal.op_types), nodes_to_exclude=excluded,
            calibrate_method=METHODS[cal.method], use_external_data_format=external,
            extra_options={"ActivationSymmetric": symmetric_activations, "WeightSymmetric": True},
        )
    except Exception as e:
        hit = calibrated_mask_tensors(typed, masks, list(cal.op_types))
        if hit and cal.method != "minmax":
            raise BadInputError(
                f"{cal.method} calibration of '{spec.name}' failed on tensors derived from integer inputs "
                f"({type(e).__name__}: {e}): {'; '.join(sorted(hit.values())[:5])}. These hold mask biases, "
                f"not activations: remove those op types from calibration.op_types (the default "
                f"[Conv, MatMul, Gemm] avoids them) or use calibration.method: minmax",
                details={"mask_tensors": sorted(hit)},
            ) from None
        raise
    if reader.samples_fed == 0:
        raise BadInputError(f"no calibration samples were fed for '{spec.name}'")
    return {"preprocess": mode, "fallbacks": fallbacks, "samples": reader.samples_fed, "batches": len(reader),
            "excluded_nodes": excluded, "mask_inputs": sorted(set(masks.values()))}


def smoke_run(path: Path, spec: ModelSpec) -> None:
    """The int8 model loads and runs in onnxruntime (parity and accuracy are the validate step's job)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    sess.run(list(spec.outputs), generate_inputs(spec, seed=spec.calibration.seed))


def calibrate(spec: ModelSpec, work: Path, data_path: Path | None = None) -> dict[str, Any]:
    work = Path(work)
    if "onnx-int8" not in spec.variants:
        raise BadInputError(f"model '{spec.name}' has no 'onnx-int8' variant configured; nothing to calibrate")
    if "tensorrt-int8" in spec.variants:
        tensorrt_build.require_tensorrt()  # fail before any work, with exit code 4
    src = workdir.variant_model_path(work, "onnx-fp32")
    if not src.is_file():
        raise BadInputError(f"'{src}' does not exist: run `convert` for this workdir first")
    try:
        onnx.checker.check_model(str(src))  # path form: reads external data beside it
    except Exception as e:  # DecodeError, ValidationError, a missing model.onnx.data, ...
        raise BadInputError(f"'{src}' is not a readable ONNX model (truncated or corrupt?): {type(e).__name__}: "
                            f"{str(e).strip()[:300].rstrip('.')}. Rerun `convert` for this workdir") from None
    started = time.monotonic()
    batches, source = calibration_batches(spec, data_path)
    log.info("calibrating '%s': %s, %d batches from %s, op types %s", spec.name, spec.calibration.method,
             len(batches), source, spec.calibration.op_types)
    # TensorRT's explicit quantization needs zero-point-free (symmetric) activations.
    symmetric = "tensorrt-int8" in spec.variants
    int8_dir = workdir.variant_dir(work, "onnx-int8")
    remove_stale(work, ".calibrate-*")
    with staged_dir(int8_dir) as tmp, tempfile.TemporaryDirectory(dir=work, prefix=".calibrate-") as scratch:
        info = quantize(spec, src, tmp / "model.onnx", batches, Path(scratch), symmetric)
        smoke_run(tmp / "model.onnx", spec)
    out = workdir.variant_model_path(work, "onnx-int8")
    fp32_bytes = sum(file_inventory(src.parent).values())
    int8_files = file_inventory(int8_dir)
    variants: dict[str, Any] = {"onnx-int8": {"path": str(out), "files": int8_files,
                                              "bytes": sum(int8_files.values())}}
    if "tensorrt-int8" in spec.variants:
        with staged_dir(workdir.variant_dir(work, "tensorrt-int8")) as tmp:
            built = tensorrt_build.build_engine(out, spec, "tensorrt-int8", tmp / "model.plan")
        plan = workdir.variant_model_path(work, "tensorrt-int8")
        variants["tensorrt-int8"] = {"path": str(plan), "bytes": plan.stat().st_size, **built}
    return {
        "workdir": str(work), "model": spec.name, "onnx_path": str(out), "variants": variants,
        "method": spec.calibration.method, "samples_configured": spec.calibration.samples, "data": source,
        "seed": spec.calibration.seed, "per_channel": spec.calibration.per_channel,
        "op_types": list(spec.calibration.op_types), "symmetric_activations": symmetric, **info,
        **count_quantized(onnx.load(str(out), load_external_data=False), list(spec.calibration.op_types)),
        "size_ratio": round(sum(int8_files.values()) / fp32_bytes, 4),
        "calibrate_seconds": round(time.monotonic() - started, 3), "library_versions": library_versions(),
    }
