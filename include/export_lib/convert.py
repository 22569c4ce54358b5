"""convert: checkpoint -> ONNX fp32 (dynamo exporter, TorchScript fallback) [-> TensorRT FP16].

An export counts only when the artifact really works with dynamic shapes: every dynamic dim of the spec is
symbolic in the graph, onnx.checker and shape inference pass, and onnxruntime runs it at sizes *other* than the
export example with outputs matching torch. The dynamo exporter can silently specialise a dim (it re-exports
with torch.export's suggested fix and reports success), so a failed check is an export failure and triggers
the TorchScript fallback.
"""

from __future__ import annotations

import logging
import re
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from export_lib import tensorrt_build, workdir
from export_lib.artifacts import file_inventory, library_versions, sha256_file, staged_dir
from export_lib.config import ModelSpec
from export_lib.modelload import build_model, forward
from export_lib.results import BadInputError
from export_lib.sampledata import generate_inputs

log = logging.getLogger(__name__)

EXPORT_BATCH = 2  # dynamo rejects some dynamic-batch models exported at batch 1 (0/1 specialisation)
SINGLE_FILE_LIMIT = 1 << 30  # below this the model is folded into one .onnx file; above, model.onnx.data beside it
DATA_FILE = "model.onnx.data"


class ExportAttemptFailed(Exception):
    """One exporter's attempt failed (the other one may still succeed)."""


# ------------------------------------------------------------------------------------------- sizes
def _in_range(value: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, value))


def example_dims(spec: ModelSpec) -> dict[str, int]:
    """Sizes of the dynamic dims used for the export example: batch 2, the others `opt` (at least 2 if allowed)."""
    out: dict[str, int] = {}
    for inp in spec.inputs:
        for axis, d in enumerate(inp.shape):
            if isinstance(d, str) and d not in out:
                r = inp.dynamic[d]
                out[d] = _in_range(EXPORT_BATCH if axis == 0 else max(r.opt, 2), r.min, r.max)
    return out


def check_dims(spec: ModelSpec, example: dict[str, int]) -> dict[str, int]:
    """A size different from the export example for every dynamic dim that has room for one."""
    out: dict[str, int] = {}
    for inp in spec.inputs:
        for d, r in inp.dynamic.items():
            e = example[d]
            candidates = [e + 1, e - 1, r.max, r.min]
            out[d] = next((c for c in candidates if r.min <= c <= r.max and c != e), e)
    return out


def describe_inputs(spec: ModelSpec, inputs: dict[str, np.ndarray]) -> str:
    return ", ".join(f"{i.name} {list(inputs[i.name].shape)} {inputs[i.name].dtype}" for i in spec.inputs)


def check_model_fits(model: torch.nn.Module, spec: ModelSpec, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run the model on inputs shaped as the spec says; a failure is the spec's fault, named as such."""
    try:
        return forward(model, spec, inputs)
    except BadInputError:
        raise
    except Exception as e:
        raise BadInputError(
            f"the input spec of model '{spec.name}' does not fit the model: running it on "
            f"{describe_inputs(spec, inputs)} failed: {type(e).__name__}: {_first_line(e)}. "
            "Check each input's shape/dtype (and order: inputs are passed positionally) in the export config"
        ) from None


def _first_line(e: BaseException, limit: int = 400) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    line = next((ln for ln in text.splitlines() if ln.strip()), type(e).__name__)
    return line if len(line) <= limit else line[:limit] + "..."


# ------------------------------------------------------------------------------------------- exporters
def _args(spec: ModelSpec, inputs: dict[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(np.ascontiguousarray(inputs[i.name])) for i in spec.inputs)


def export_dynamo(model: torch.nn.Module, spec: ModelSpec, inputs: dict[str, np.ndarray], path: Path) -> None:
    from torch.export import Dim

    dims: dict[str, Any] = {}
    shapes = []
    for inp in spec.inputs:
        axes = {}
        for axis, d in enumerate(inp.shape):
            if isinstance(d, str):
                r = inp.dynamic[d]
                # One Dim object per name: inputs sharing "batch" are constrained to be equal.
                dims.setdefault(d, Dim(re.sub(r"\W", "_", d), min=r.min, max=r.max))
                axes[axis] = dims[d]
        shapes.append(axes or None)
    program = torch.onnx.export(
        model, _args(spec, inputs), dynamo=True, dynamic_shapes=tuple(shapes), opset_version=spec.opset,
        input_names=[i.name for i in spec.inputs], output_names=list(spec.outputs), verbose=False,
    )
    program.save(str(path))


def export_torchscript(model: torch.nn.Module, spec: ModelSpec, inputs: dict[str, np.ndarray], path: Path) -> None:
    dynamic_axes = {i.name: {a: d for a, d in enumerate(i.shape) if isinstance(d, str)} for i in spec.inputs}
    batch = spec.inputs[0].shape[0]
    if isinstance(batch, str):  # outputs share the batch dim; their other dims follow from the graph
        dynamic_axes.update({o: {0: batch} for o in spec.outputs})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice; the choice is logged
        torch.onnx.export(
            model, _args(spec, inputs), str(path), dynamo=False, opset_version=spec.opset,
            input_names=[i.name for i in spec.inputs], output_names=list(spec.outputs),
            dynamic_axes={k: v for k, v in dynamic_axes.items() if v}, do_constant_folding=True,
        )


EXPORTERS = {"dynamo": export_dynamo, "torchscript": export_torchscript}


# ------------------------------------------------------------------------------------------- checks
def graph_dims(model: onnx.ModelProto) -> dict[str, dict[str, list[int | str | None]]]:
    """{"inputs": {name: dims}, "outputs": {...}}; a dim is an int, a symbol name, or None (unknown)."""
    def dims(vi: onnx.ValueInfoProto) -> list[int | str | None]:
        return [d.dim_param or (d.dim_value if d.HasField("dim_value") else None)
                for d in vi.type.tensor_type.shape.dim]

    initializers = {i.name for i in model.graph.initializer}
    return {"inputs": {vi.name: dims(vi) for vi in model.graph.input if vi.name not in initializers},
            "outputs": {vi.name: dims(vi) for vi in model.graph.output}}


def specialised_dims(model: onnx.ModelProto, spec: ModelSpec) -> list[str]:
    """Problems with the graph's inputs: missing/renamed inputs and dynamic dims of the spec that are fixed."""
    found = graph_dims(model)["inputs"]
    problems = []
    if list(found) != [i.name for i in spec.inputs]:
        problems.append(f"graph inputs {list(found)} != configured inputs {[i.name for i in spec.inputs]}")
    for inp in spec.inputs:
        got = found.get(inp.name)
        if got is None:
            continue
        if len(got) != len(inp.shape):
            problems.append(f"input '{inp.name}' has rank {len(got)} in the graph, {len(inp.shape)} in the spec")
            continue
        for axis, (want, have) in enumerate(zip(inp.shape, got, strict=True)):
            if isinstance(want, str) and not isinstance(have, str):
                problems.append(f"input '{inp.name}' axis {axis} ('{want}') was specialised to {have}")
    return problems


def _mismatch(ref: np.ndarray, got: np.ndarray, atol: float, rtol: float) -> tuple[float, float]:
    """(fraction of elements exceeding both atol and rtol*|ref|, max abs error)."""
    ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
    err = np.abs(ref64 - got64)
    bad = (err > atol) & (err > rtol * np.abs(ref64))
    bad |= np.isnan(got64) != np.isnan(ref64)
    return (float(bad.mean()) if bad.size else 0.0), (float(np.nanmax(err)) if err.size else 0.0)


def run_dynamic_check(path: Path, model: torch.nn.Module, spec: ModelSpec, dims: dict[str, int],
                      seed: int = 7) -> dict[str, Any]:
    """Run the ONNX model with onnxruntime at `dims` and compare with torch eager (the onnx-fp32 tolerance)."""
    import onnxruntime as ort

    batch = next((d for d in (spec.inputs[0].shape[0],) if isinstance(d, str)), None)
    inputs = generate_inputs(spec, seed=seed, dims=dims)
    shapes = {k: list(v.shape) for k, v in inputs.items()}
    ref = forward(model, spec, inputs)
    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outs = sess.run(list(spec.outputs), inputs)
    except Exception as e:
        raise ExportAttemptFailed(f"onnxruntime cannot run the model at {shapes}: {_first_line(e)}") from None
    tol = spec.tolerance("onnx-fp32")
    report = {"dims": dims, "batch_dim": batch, "input_shapes": shapes, "outputs": {}}
    for name, got in zip(spec.outputs, outs, strict=True):
        if got.shape != ref[name].shape:
            raise ExportAttemptFailed(
                f"output '{name}' has shape {list(got.shape)} in onnxruntime, {list(ref[name].shape)} in torch "
                f"at {shapes}")
        frac, max_abs = _mismatch(ref[name], got, tol.atol, tol.rtol)
        report["outputs"][name] = {"shape": list(got.shape), "max_abs_error": max_abs, "mismatch_fraction": frac}
        if frac > tol.max_mismatch_fraction:
            raise ExportAttemptFailed(
                f"output '{name}' diverges from torch at {shapes}: {frac:.1%} of elements exceed atol {tol.atol} "
                f"and rtol {tol.rtol} (max abs error {max_abs:.3g}); the export baked in example-specific values")
    return report


def finalize(raw: Path, out: Path) -> None:
    """Rewrite the exporter's output as `out` (+ `model.onnx.data` when large) so the directory is self-contained:
    external data always sits beside the model under a fixed relative name."""
    model = onnx.load(str(raw), load_external_data=True)
    size = sum(p.stat().st_size for p in raw.parent.iterdir() if p.is_file())
    if size < SINGLE_FILE_LIMIT:
        onnx.save_model(model, str(out))
    else:
        onnx.save_model(model, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=DATA_FILE, size_threshold=1024)
    onnx.checker.check_model(str(out), full_check=True)  # path form: works with external data
    onnx.shape_inference.infer_shapes_path(str(out), str(out), check_type=True, strict_mode=True)


def export_with_fallback(model: torch.nn.Module, spec: ModelSpec, out_dir: Path) -> dict[str, Any]:
    """Export into `out_dir/model.onnx`, dynamo first, TorchScript second; returns what happened."""
    ex_dims = example_dims(spec)
    example = generate_inputs(spec, seed=0, dims=ex_dims)
    check_model_fits(model, spec, example)
    other_dims = check_dims(spec, ex_dims)
    out = out_dir / "model.onnx"
    failures: dict[str, str] = {}
    for name, export in EXPORTERS.items():
        started = time.monotonic()
        log.info("exporting '%s' with the %s exporter (example %s)", spec.name, name, describe_inputs(spec, example))
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".raw-") as scratch:
            try:
                raw = Path(scratch) / "model.onnx"
                with torch.inference_mode(False), torch.no_grad():
                    export(model, spec, example, raw)
                finalize(raw, out)
                problems = specialised_dims(onnx.load(str(out), load_external_data=False), spec)
                if problems:
                    raise ExportAttemptFailed("; ".join(problems))
                check = run_dynamic_check(out, model, spec, other_dims)
            except Exception as e:
                reason = f"{type(e).__name__}: {_first_line(e)}"
                log.warning("%s export of '%s' failed: %s", name, spec.name, reason)
                log.debug("%s export failure", name, exc_info=True)
                failures[name] = reason
                for p in (out, out_dir / DATA_FILE):
                    p.unlink(missing_ok=True)
                continue
        if failures:
            log.warning("'%s' exported with the %s exporter after: %s", spec.name, name, failures)
        return {"exporter": name, "fallback_reason": failures.get("dynamo"), "failed_attempts": failures,
                "export_seconds": round(time.monotonic() - started, 3), "example_dims": ex_dims,
                "dynamic_check": check}
    raise BadInputError(
        f"model '{spec.name}' could not be exported to ONNX with dynamic {sorted(ex_dims)}: "
        + "; ".join(f"{k}: {v}" for k, v in failures.items()),
        details={"failed_attempts": failures},
    )


def describe_onnx(path: Path) -> dict[str, Any]:
    model = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return {"opset": opset, **graph_dims(model)}


# ------------------------------------------------------------------------------------------- the step
def convert(spec: ModelSpec, checkpoint: Path, work: Path) -> dict[str, Any]:
    work = Path(work)
    if "tensorrt-fp16" in spec.variants:
        tensorrt_build.require_tensorrt()  # fail before any work, with exit code 4
    log.info("loading '%s' from %s", spec.name, checkpoint)
    model = build_model(spec, checkpoint)
    onnx_dir = workdir.variant_dir(work, "onnx-fp32")
    with staged_dir(onnx_dir) as tmp:
        info = export_with_fallback(model, spec, tmp)
    path = workdir.variant_model_path(work, "onnx-fp32")
    variants: dict[str, Any] = {"onnx-fp32": {"path": str(path), "files": file_inventory(onnx_dir),
                                              "bytes": sum(file_inventory(onnx_dir).values())}}
    if "tensorrt-fp16" in spec.variants:
        with staged_dir(workdir.variant_dir(work, "tensorrt-fp16")) as tmp:
            built = tensorrt_build.build_engine(path, spec, "tensorrt-fp16", tmp / "model.plan")
        plan = workdir.variant_model_path(work, "tensorrt-fp16")
        variants["tensorrt-fp16"] = {"path": str(plan), "bytes": plan.stat().st_size, **built}
    graph = describe_onnx(path)
    return {
        "workdir": str(work), "model": spec.name, "checkpoint": str(checkpoint),
        "checkpoint_sha256": sha256_file(checkpoint), "variants": variants, "onnx_path": str(path),
        **info, "opset": graph["opset"], "inputs": graph["inputs"], "outputs": graph["outputs"],
        "library_versions": library_versions(),
    }
