"""validate: every built variant against torch eager, on seeded samples at several sizes and on real eval data.

Cases: `opt` (spec.validation.samples seeded samples at the opt dims, in batches of the opt batch), one case per
size in spec.validation.extra_dims, a batch other than opt by default (export examples are usually the opt or
batch 2, and a silently specialised batch dim only shows at another size), and `eval` (accuracy.eval_data).
Per variant and output: parity.judge over all cases. Quantized variants are also gated on the accuracy metric
(on the eval data when configured, else on the generated samples). The table then goes through great-expectations.
Any failure -> reports written, then ValidationFailedError naming variant, output and figures; a failure of a
variant in spec.validation.optional_variants is recorded as rejected instead (select will not choose it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from export_lib import gx_suite, parity, runners, sampledata
from export_lib.config import QUANTIZED_VARIANTS, ModelSpec
from export_lib.modelload import build_model
from export_lib.results import BadInputError, ValidationFailedError, write_json
from export_lib.workdir import checkpoint_path, data_path, report_path, variant_model_path

log = logging.getLogger(__name__)

# Which step writes each variant's artifact (for "run X first").
PRODUCED_BY = {"onnx-fp32": "convert", "tensorrt-fp16": "convert", "onnx-int8": "calibrate",
               "tensorrt-int8": "calibrate"}


@dataclass
class Case:
    name: str
    batches: list[dict[str, np.ndarray]]
    dims: dict[str, int] = field(default_factory=dict)
    labels: np.ndarray | None = None

    @property
    def samples(self) -> int:
        return sum(next(iter(b.values())).shape[0] for b in self.batches)


# ------------------------------------------------------------------------------------------------- cases
def opt_batch(spec: ModelSpec) -> int:
    lead = spec.inputs[0].shape[0]
    return spec.inputs[0].dynamic[lead].opt if isinstance(lead, str) else int(lead)


def dim_ranges(spec: ModelSpec) -> dict[str, tuple[int, int]]:
    """(min, max) of every named dynamic dim; an intersection where several inputs share a name."""
    out: dict[str, tuple[int, int]] = {}
    for inp in spec.inputs:
        for name, d in inp.dynamic.items():
            lo, hi = out.get(name, (d.min, d.max))
            out[name] = (max(lo, d.min), min(hi, d.max))
    return out


def default_other_batch(spec: ModelSpec) -> int | None:
    """A batch size other than opt inside the batch range: 3 (neither 1, 2 nor a power of two) when allowed."""
    name = sampledata.batch_dim_name(spec)
    if name is None:
        return None
    lo, hi = dim_ranges(spec)[name]
    ob = opt_batch(spec)
    return next((b for b in (3, ob + 1, hi, lo) if lo <= b <= hi and b != ob), None)


def build_cases(spec: ModelSpec, eval_file: Path | None) -> list[Case]:
    v, ob = spec.validation, opt_batch(spec)
    batch_name = sampledata.batch_dim_name(spec)
    ranges = dim_ranges(spec)
    cases = [Case("opt", sampledata.generate_batches(spec, v.samples, ob, v.seed), {"batch": ob})]
    extra = {k: list(sizes) for k, sizes in v.extra_dims.items()}
    other = default_other_batch(spec)
    if batch_name and other is not None and batch_name not in extra:
        extra[batch_name] = [other]
    for k, (name, sizes) in enumerate(sorted(extra.items())):
        if name not in ranges:
            raise BadInputError(f"validation.extra_dims names '{name}', which is not a dynamic dim of any input "
                                f"(dynamic dims: {sorted(ranges)})")
        for j, size in enumerate(sizes):
            lo, hi = ranges[name]
            if not lo <= size <= hi:
                raise BadInputError(f"validation.extra_dims.{name} has {size}, outside the dim's range [{lo}, {hi}]"
                                    " (engines are built for that range only)")
            seed = v.seed + 1000 * (k + 1) + j  # distinct from the opt samples
            batch = sampledata.generate_inputs(spec, seed=seed, dims={name: size})
            cases.append(Case(f"{name}={size}", [batch], {name: size}))
    if eval_file is not None:
        inputs, labels = sampledata.load_npz(eval_file, spec)
        if labels is None and spec.accuracy.metric == "top1_accuracy":
            raise BadInputError(f"accuracy.eval_data '{eval_file}' has no `labels` array, which accuracy.metric "
                                "top1_accuracy needs (1-D integers, one per sample): add it with "
                                "np.savez(path, ..., labels=...) or use metric top1_agreement")
        limit = spec.accuracy.max_samples
        batches = sampledata.split_batches(inputs, ob, limit)
        n = sum(next(iter(b.values())).shape[0] for b in batches)
        cases.append(Case("eval", batches, {"batch": ob}, None if labels is None else labels[:n]))
    return cases


def run_cases(runner: Any, cases: list[Case]) -> list[list[dict[str, np.ndarray]]]:
    return [[runner(batch) for batch in case.batches] for case in cases]


# --------------------------------------------------------------------------------------------- accuracy
def predictions(outputs: list[dict[str, np.ndarray]], output: str) -> np.ndarray:
    """Top-1 class per sample (argmax of the last axis), concatenated over batches."""
    return np.concatenate([np.asarray(o[output]).argmax(axis=-1).reshape(-1) for o in outputs])


def accuracy_samples(cases: list[Case]) -> list[int]:
    """Indices of the cases accuracy is measured on: the eval data when configured, else every generated case."""
    idx = [i for i, c in enumerate(cases) if c.name == "eval"]
    return idx or list(range(len(cases)))


def top1(spec: ModelSpec, cases: list[Case], outs: list[list[dict]], ref: list[list[dict]]) -> float:
    """The spec's metric for one runner: agreement with the reference, or accuracy against the labels."""
    name = spec.accuracy.output or spec.outputs[0]
    idx = accuracy_samples(cases)
    pred = np.concatenate([predictions(outs[i], name) for i in idx])
    if spec.accuracy.metric == "top1_accuracy":
        labels = np.concatenate([cases[i].labels for i in idx if cases[i].labels is not None])
        classes = np.asarray(outs[idx[0]][0][name]).shape[-1]
        if labels.size and (labels.min() < 0 or labels.max() >= classes):
            raise BadInputError(f"accuracy.eval_data '{spec.accuracy.eval_data}': labels range over "
                                f"[{labels.min()}, {labels.max()}] but output '{name}' has {classes} classes; "
                                f"labels must be class indices in [0, {classes - 1}]")
        if labels.shape != pred.shape:
            raise BadInputError(f"accuracy.eval_data: {labels.shape[0]} labels for {pred.shape[0]} predictions of "
                                f"output '{name}' (top1_accuracy needs one label per sample)")
        return float((pred == labels).mean())
    return float((pred == np.concatenate([predictions(ref[i], name) for i in idx])).mean())


# ------------------------------------------------------------------------------------------------ parity
def parity_table(spec: ModelSpec, variant: str, cases: list[Case], ref: list[list[dict]],
                 outs: list[list[dict]]) -> dict[str, dict[str, Any]]:
    tol = spec.tolerance(variant)
    table = {}
    for output in spec.outputs:
        have = sorted(outs[0][0])
        if output not in have:
            table[output] = missing_output_row(variant, output, have, tol)
            continue
        per_case = {}
        for case, ref_batches, got_batches in zip(cases, ref, outs, strict=True):
            per_case[case.name] = parity.combine(parity.compare(r[output], g[output], tol)
                                                 for r, g in zip(ref_batches, got_batches, strict=True))
        row = parity.judge(variant, output, parity.combine(per_case.values()), tol)
        row["cases"] = {k: {f: c[f] for f in ("shape", "ref_shape", "mismatch_count", "elements", "max_abs_err",
                                              "max_rel_err", "nan_count", "inf_count", "degenerate")}
                        for k, c in per_case.items()}
        table[output] = row
    return table


def missing_output_row(variant: str, output: str, have: list[str], tol: Any) -> dict[str, Any]:
    reason = (f"{variant} has no output '{output}' (its outputs: {have}); the spec's `outputs` must name the "
              "exported graph's outputs")
    return {"shape": None, "ref_shape": None, "shape_match": False, "elements": 0, "mismatch_count": 0,
            "mismatch_fraction": 1.0, "max_abs_err": 0.0, "max_rel_err": 0.0, "nan_count": 0, "inf_count": 0,
            "ref_nan_count": 0, "ref_inf_count": 0, "atol": tol.atol, "rtol": tol.rtol,
            "max_mismatch_fraction": tol.max_mismatch_fraction, "degenerate": None, "cases": {},
            "passed": False, "reasons": [reason], "warnings": []}


# ---------------------------------------------------------------------------------------------- validate
def require_artifacts(spec: ModelSpec, workdir: Path) -> dict[str, Path]:
    paths = {v: variant_model_path(workdir, v) for v in spec.variants}
    for v, p in paths.items():
        if not p.is_file():
            raise BadInputError(f"variant '{v}' has no artifact at {p}: run `{PRODUCED_BY[v]}` for this workdir "
                                "first (validate checks what convert/calibrate built)")
    return paths


def validate(spec: ModelSpec, workdir: Path, config_dir: Path | None = None,
             threads: int | None = None) -> dict[str, Any]:
    workdir = Path(workdir)
    paths = require_artifacts(spec, workdir)
    eval_file = data_path(workdir, spec.accuracy.eval_data, config_dir) if spec.accuracy.eval_data else None
    cases = build_cases(spec, eval_file)
    log.info("validate %s: %d cases (%s), %d variants", spec.name, len(cases),
             ", ".join(f"{c.name}:{c.samples}" for c in cases), len(paths))

    eager = runners.TorchRunner(build_model(spec, checkpoint_path(workdir, spec)), spec, threads)
    ref = run_cases(eager, cases)
    metric = spec.accuracy.metric
    eager_acc = top1(spec, cases, ref, ref) if metric == "top1_accuracy" else 1.0

    variants: dict[str, Any] = {}
    for variant, path in paths.items():
        log.info("validate %s: running %s (%s)", spec.name, variant, path)
        runner = runners.make_runner(variant, path, threads)
        try:
            outs = run_cases(runner, cases)
            describe = runner.describe()
        finally:
            runners.close(runner)
        table = parity_table(spec, variant, cases, ref, outs)
        acc = top1(spec, cases, outs, ref)
        gated = variant in QUANTIZED_VARIANTS
        reasons = [r for row in table.values() for r in row["reasons"]]
        if gated and acc < spec.accuracy.threshold:
            reasons.append(f"{variant}: {metric} {acc:.4f} is below the threshold {spec.accuracy.threshold:.4f} "
                           f"(torch eager: {eager_acc:.4f})")
        variants[variant] = {
            "artifact": str(path), "runner": describe, "outputs": table,
            "accuracy": {"metric": metric, "value": acc, "threshold": spec.accuracy.threshold, "gated": gated,
                         "passed": (acc >= spec.accuracy.threshold) if gated else None},
            "passed": not reasons, "reasons": reasons,
            "warnings": [w for row in table.values() for w in row["warnings"]],
        }

    gx_result = gx_suite.run_suite(
        [{"variant": v, "output": o, **row} for v, info in variants.items() for o, row in info["outputs"].items()],
        [{"variant": v, "accuracy": info["accuracy"]["value"], "threshold": info["accuracy"]["threshold"]}
         for v, info in variants.items() if info["accuracy"]["gated"]],
        suite_name=f"{spec.name}-validation")
    write_json(report_path(workdir, "gx_result"), gx_result)
    _apply_gx(variants, gx_result)

    optional = set(spec.validation.optional_variants)
    failures = [r for v, info in variants.items() if v not in optional for r in info["reasons"]]
    rejected = {v: info["reasons"] for v, info in variants.items() if v in optional and info["reasons"]}
    for v, reasons in rejected.items():
        log.warning("validate %s: optional variant %s rejected (it will not be selected): %s", spec.name, v,
                    "; ".join(reasons))
    report = {
        "model": spec.name,
        "passed": not failures,
        "failures": failures,
        "rejected_optional": rejected,
        "reference": {"runner": eager.describe(), "checkpoint": str(checkpoint_path(workdir, spec))},
        "cases": [{"name": c.name, "dims": c.dims, "samples": c.samples, "batches": len(c.batches)} for c in cases],
        "accuracy": {
            "metric": metric, "threshold": spec.accuracy.threshold,
            "data": "eval" if eval_file is not None else "generated",
            "samples": sum(cases[i].samples for i in accuracy_samples(cases)),
            "values": {runners.EAGER: eager_acc, **{v: i["accuracy"]["value"] for v, i in variants.items()}},
        },
        "variants": variants,
        "gx": {"success": gx_result["success"], "report": str(report_path(workdir, "gx_result"))},
    }
    write_json(report_path(workdir, "validation"), report)
    summary = {v: {"passed": i["passed"], "accuracy": i["accuracy"]["value"],
                   "max_mismatch_fraction": max(r["mismatch_fraction"] for r in i["outputs"].values())}
               for v, i in variants.items()}
    if failures:
        raise ValidationFailedError(f"validation of '{spec.name}' failed: " + "; ".join(failures),
                                    details={"report": str(report_path(workdir, "validation")), "variants": summary})
    return {"model": spec.name, "workdir": str(workdir), "passed": True, "variants": summary,
            "rejected_optional": sorted(rejected),
            "accuracy": report["accuracy"]["values"], "report": str(report_path(workdir, "validation")),
            "gx_result": str(report_path(workdir, "gx_result"))}


def _apply_gx(variants: dict[str, Any], gx_result: dict[str, Any]) -> None:
    """A failed expectation our own judgement missed still fails its variant (or all, if it names none)."""
    if gx_result["success"]:
        return
    for r in gx_result["results"]:
        if r["success"]:
            continue
        targets = [r["variant"]] if r["variant"] in variants else list(variants)
        for v in targets:
            if not variants[v]["reasons"]:
                error = f", {r['exception']}" if r["exception"] else ""
                variants[v]["reasons"].append(
                    f"{v}: great-expectations {r['expectation']} on '{r['column']}' failed "
                    f"(bounds {r['bounds']}, unexpected {r['unexpected']}{error})")
                variants[v]["passed"] = False
