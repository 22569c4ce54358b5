"""select: choose the variant to serve from the validation and benchmark reports (pure: no torch, no runtimes).

Criterion: the lowest p50 latency at one batch size, by default the largest of spec.benchmark.batch_sizes (the
serving batch under load; pass another with --batch-size), among variants that passed validation (parity and,
for quantized variants, accuracy). An INT8 variant must also be faster than its FP counterpart at that batch by
more than the benchmark's noise band (benchmark.stability, 10 % by default): quantization costs accuracy, so it
only earns its place by being measurably faster (on some CPUs INT8 transformers are ~2x slower, and a 1 % "win"
is noise). Every variant gets a recorded reason for being chosen or not.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from export_lib.config import QUANTIZED_VARIANTS, VARIANTS
from export_lib.results import ValidationFailedError

# The FP variant an INT8 variant must beat, in order of preference (the first one available).
FP_COUNTERPARTS = {"onnx-int8": ("onnx-fp32",), "tensorrt-int8": ("tensorrt-fp16", "onnx-fp32")}
EAGER = "torch-eager"


def fp_counterpart(variant: str, available: Collection[str]) -> str | None:
    return next((c for c in FP_COUNTERPARTS.get(variant, ()) if c in available), None)


def default_batch_size(benchmark: dict[str, Any]) -> int:
    return max(benchmark["settings"]["batch_sizes"])


def select_variant(variants: Sequence[str], validation: dict[str, Any], benchmark: dict[str, Any],
                   batch_size: int | None = None) -> dict[str, Any]:
    """The selection report: `selected`, the criterion, and a decision with its reason for every variant."""
    b = str(batch_size or default_batch_size(benchmark))
    results = benchmark.get("results", {})
    decisions: dict[str, dict[str, Any]] = {}
    p50: dict[str, float] = {}
    for v in variants:
        val = validation.get("variants", {}).get(v)
        acc = (val or {}).get("accuracy", {})
        decisions[v] = {"chosen": False, "passed_validation": bool(val and val["passed"]),
                        "accuracy": acc.get("value"), "p50_ms": results.get(v, {}).get(b, {}).get("p50_ms")}
        if val is None:
            decisions[v]["reason"] = "not in the validation report (was it built and validated?)"
        elif not val["passed"]:
            decisions[v]["reason"] = "failed validation: " + "; ".join(val["reasons"])
        elif decisions[v]["p50_ms"] is None:
            decisions[v]["reason"] = f"not benchmarked at batch {b}"
        else:
            p50[v] = decisions[v]["p50_ms"]

    eligible = dict(p50)
    margin = float(benchmark.get("settings", {}).get("stability", 0.0))
    for v in [v for v in p50 if v in QUANTIZED_VARIANTS]:
        fp = fp_counterpart(v, p50)
        metric = f"{validation['accuracy']['metric']} {decisions[v]['accuracy']:.4f}" \
            if decisions[v]["accuracy"] is not None and "accuracy" in validation else "accuracy passed"
        if fp is None:
            decisions[v]["reason"] = (f"accurate enough ({metric}) but no validated FP counterpart "
                                      f"({' or '.join(FP_COUNTERPARTS[v])}) was benchmarked to show INT8 is faster")
            del eligible[v]
        elif p50[fp] / p50[v] <= 1 + margin:
            decisions[v]["reason"] = (f"INT8 is not faster than {fp} at batch {b} by more than the "
                                      f"{100 * margin:.0f}% noise margin (benchmark.stability): p50 {p50[v]:.3f} ms "
                                      f"vs {p50[fp]:.3f} ms ({p50[fp] / p50[v]:.2f}x); not worth its accuracy cost "
                                      f"({metric})")
            del eligible[v]

    if not eligible:
        raise ValidationFailedError(
            "no variant can be served: " + "; ".join(f"{v}: {d['reason']}" for v, d in decisions.items()),
            details={"decisions": decisions})
    chosen = min(eligible, key=lambda v: (eligible[v], VARIANTS.index(v) if v in VARIANTS else len(VARIANTS)))
    eager = results.get(EAGER, {}).get(b, {}).get("p50_ms")
    for v, t in eligible.items():
        if v == chosen:
            vs_eager = f", {eager / t:.2f}x torch eager" if eager else ""
            decisions[v].update(chosen=True, reason=f"fastest variant that passed validation at batch {b}: "
                                                    f"p50 {t:.3f} ms{vs_eager}")
        else:
            decisions[v]["reason"] = (f"passed validation but slower than {chosen} at batch {b}: p50 {t:.3f} ms vs "
                                      f"{eligible[chosen]:.3f} ms")
    return {
        "selected": chosen,
        "batch_size": int(b),
        "criterion": f"lowest p50 latency at batch {b} ("
                     f"{'given' if batch_size else 'largest configured'} batch size) among variants that passed "
                     f"validation; INT8 only when more than {100 * margin:.0f}% faster than its FP counterpart",
        "p50_ms": eligible[chosen],
        "torch_eager_p50_ms": eager,
        "decisions": decisions,
    }
