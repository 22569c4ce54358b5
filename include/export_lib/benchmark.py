"""benchmark: latency and throughput of every validated variant and of torch eager, in one run, interleaved.

Per batch size, all runners are measured together: a warm-up round, then measurement windows of
`spec.benchmark.window` requests taken round-robin (one window per runner in turn, the starting runner rotating),
so a noisy neighbour or a frequency change hits every runner alike. Measuring stops when, for every runner, the
mean latencies of its last 3 windows are each within `stability` of their average (Triton Model Navigator's rule),
or after `max_windows`; whether each runner stabilised is recorded. Percentiles come from those last 3 windows.

Ratios: speedup = reference p50 / variant p50 (> 1 means the variant is faster) against torch eager, and for
INT8 variants against their FP counterpart. `baseline` (a previous benchmark.json, or a published manifest.json
which carries it under `benchmark`) flags p50 regressions beyond spec.benchmark.regression_threshold.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from export_lib import runners, sampledata
from export_lib.config import BenchmarkSpec, ModelSpec
from export_lib.modelload import build_model
from export_lib.results import BadInputError, ValidationFailedError, read_json, write_json
from export_lib.select import fp_counterpart
from export_lib.validate import dim_ranges
from export_lib.workdir import checkpoint_path, report_path, variant_model_path

log = logging.getLogger(__name__)

STABLE_WINDOWS = 3


# ------------------------------------------------------------------------------------- measurement (pure)
def is_stable(window_means: Sequence[float], stability: float, k: int = STABLE_WINDOWS) -> bool:
    """The last k window means are each within `stability` (a fraction) of their average."""
    if len(window_means) < k:
        return False
    last = window_means[-k:]
    avg = sum(last) / k
    return all(abs(m - avg) <= stability * avg for m in last)


def round_order(names: Sequence[str], window_index: int) -> list[str]:
    """Round-robin order for one window; the first runner rotates so none always runs first (or after the same
    neighbour)."""
    s = window_index % len(names)
    return [*names[s:], *names[:s]]


def measure(requests: Mapping[str, Callable[[], Any]], settings: BenchmarkSpec,
            timer: Callable[[], float] = time.perf_counter) -> dict[str, dict[str, Any]]:
    """Interleaved windows over `requests` (name -> one request); latencies in seconds as measured by `timer`."""
    names = list(requests)
    for _ in range(settings.warmup):
        for name in names:
            requests[name]()
    windows: dict[str, list[list[float]]] = {n: [] for n in names}
    for w in range(settings.max_windows):
        for name in round_order(names, w):
            fn, lat = requests[name], []
            for _ in range(settings.window):
                t0 = timer()
                fn()
                lat.append(timer() - t0)
            windows[name].append(lat)
        if all(is_stable(_means(windows[n]), settings.stability) for n in names):
            break
    return {n: {"windows": len(ws), "window_means_s": _means(ws), "stable": is_stable(_means(ws), settings.stability),
                "latencies_s": [x for lat in ws[-STABLE_WINDOWS:] for x in lat]}
            for n, ws in windows.items()}


def _means(windows: list[list[float]]) -> list[float]:
    return [sum(w) / len(w) for w in windows]


def summarize(latencies_s: Sequence[float], batch_size: int) -> dict[str, float]:
    ms = np.asarray(latencies_s, dtype=np.float64) * 1e3
    p50, p90, p95, p99 = np.percentile(ms, [50, 90, 95, 99])
    return {"p50_ms": float(p50), "p90_ms": float(p90), "p95_ms": float(p95), "p99_ms": float(p99),
            "mean_ms": float(ms.mean()), "throughput_per_s": float(batch_size * 1e3 / ms.mean()),
            "requests": int(ms.size)}


# ---------------------------------------------------------------------------------------- comparisons (pure)
def ratios(results: dict[str, dict[str, dict[str, Any]]], variants: Sequence[str]) -> dict[str, Any]:
    """speedup_vs_eager per variant and batch; for INT8 variants also speedup over their FP counterpart."""
    out: dict[str, Any] = {}
    eager = results[runners.EAGER]
    for v in variants:
        per_batch = {}
        for b, r in results[v].items():
            entry = {"speedup_vs_eager": eager[b]["p50_ms"] / r["p50_ms"]}
            fp = fp_counterpart(v, list(results))
            if fp is not None:
                entry.update(fp_counterpart=fp, speedup_vs_fp=results[fp][b]["p50_ms"] / r["p50_ms"])
            per_batch[b] = entry
        out[v] = per_batch
    return out


def load_baseline(path: Path) -> dict[str, Any]:
    """The `results` of a benchmark.json, or of the `benchmark` a published manifest.json carries."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"--baseline '{path}' does not exist (give a benchmark.json or a manifest.json)")
    doc = read_json(path)
    bench = doc.get("benchmark") if isinstance(doc, dict) and "results" not in doc else doc
    if not isinstance(bench, dict) or not isinstance(bench.get("results"), dict):
        raise BadInputError(f"--baseline '{path}' has no benchmark results (expected a benchmark.json with "
                            "`results`, or a manifest.json with `benchmark.results`)")
    return bench["results"]


def regressions(results: dict[str, dict[str, dict[str, Any]]], baseline: dict[str, Any],
                threshold: float) -> list[dict[str, Any]]:
    """Every (variant, batch) present in both whose p50 is slower than the baseline's by more than `threshold`."""
    out = []
    for v, per_batch in results.items():
        for b, r in per_batch.items():
            base = baseline.get(v, {}).get(b)
            if not base or not base.get("p50_ms"):
                continue
            slower = r["p50_ms"] / base["p50_ms"] - 1
            if slower > threshold:
                out.append({"variant": v, "batch_size": int(b), "p50_ms": r["p50_ms"],
                            "baseline_p50_ms": base["p50_ms"], "slower_by": slower, "threshold": threshold})
    return out


# ------------------------------------------------------------------------------------------------ the step
def passing_variants(spec: ModelSpec, workdir: Path) -> list[str]:
    path = report_path(workdir, "validation")
    if not path.is_file():
        raise BadInputError(f"no validation report at {path}: run `validate` for this workdir first")
    report = read_json(path)
    passed = [v for v in spec.variants if report.get("variants", {}).get(v, {}).get("passed")]
    if not passed:
        raise ValidationFailedError(f"no variant of '{spec.name}' passed validation ({path}); nothing to benchmark")
    return passed


def check_batch_sizes(spec: ModelSpec) -> None:
    name = sampledata.batch_dim_name(spec)
    if name is None:
        return
    lo, hi = dim_ranges(spec)[name]
    bad = [b for b in spec.benchmark.batch_sizes if not lo <= b <= hi]
    if bad:
        raise BadInputError(f"benchmark.batch_sizes {bad} are outside the '{name}' range [{lo}, {hi}] of the inputs; "
                            "engines only accept that range")


def thread_settings(threads: int | None) -> dict[str, Any]:
    return {"requested_intra_op_threads": threads, "torch_num_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(),
            "onnxruntime_intra_op_threads": threads or "default (one per physical core)",
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "onnxruntime": ort.__version__,
            **runners.cpu_info()}


def benchmark(spec: ModelSpec, workdir: Path, baseline: Path | None = None, fail_on_regression: bool = False,
              threads: int | None = None) -> dict[str, Any]:
    workdir = Path(workdir)
    variants = passing_variants(spec, workdir)
    check_batch_sizes(spec)
    settings, threads = spec.benchmark, threads or spec.benchmark.threads
    base = load_baseline(baseline) if baseline else None
    all_runners: dict[str, Any] = {runners.EAGER: runners.TorchRunner(
        build_model(spec, checkpoint_path(workdir, spec)), spec, threads)}
    try:
        for v in variants:
            all_runners[v] = runners.make_runner(v, variant_model_path(workdir, v), threads)
        results: dict[str, dict[str, Any]] = {n: {} for n in all_runners}
        for b in settings.batch_sizes:
            feeds = sampledata.generate_inputs(spec, batch=b, seed=spec.validation.seed)
            log.info("benchmark %s: batch %d, %s interleaved", spec.name, b, ", ".join(all_runners))
            started = time.monotonic()
            measured = measure({n: (lambda r=r, f=feeds: r(f)) for n, r in all_runners.items()}, settings)
            for n, m in measured.items():
                results[n][str(b)] = {**summarize(m["latencies_s"], b), "stable": m["stable"],
                                      "windows": m["windows"],
                                      "window_means_ms": [x * 1e3 for x in m["window_means_s"]]}
            log.info("benchmark %s: batch %d done in %.1f s: %s", spec.name, b, time.monotonic() - started,
                     ", ".join(f"{n} p50 {results[n][str(b)]['p50_ms']:.3f} ms" for n in all_runners))
        described = {n: r.describe() for n, r in all_runners.items()}
    finally:
        for r in all_runners.values():
            runners.close(r)
    found = regressions({v: results[v] for v in variants}, base, settings.regression_threshold) if base else []
    report = {
        "model": spec.name, "variants": variants, "reference": runners.EAGER,
        "settings": settings.model_dump(mode="json"), "threads": thread_settings(threads), "runners": described,
        "results": results, "ratios": ratios(results, variants),
        "stable": all(r["stable"] for per in results.values() for r in per.values()),
        "baseline": str(baseline) if baseline else None, "regressions": found,
    }
    write_json(report_path(workdir, "benchmark"), report)
    for r in found:
        log.warning("benchmark %s: %s at batch %d is %.0f%% slower than the baseline (p50 %.3f ms vs %.3f ms)",
                    spec.name, r["variant"], r["batch_size"], 100 * r["slower_by"], r["p50_ms"], r["baseline_p50_ms"])
    if found and fail_on_regression:
        raise ValidationFailedError(
            f"benchmark of '{spec.name}': {len(found)} p50 regression(s) beyond "
            f"{100 * settings.regression_threshold:.0f}% vs {baseline}: " + "; ".join(
                f"{r['variant']} batch {r['batch_size']} {r['p50_ms']:.3f} ms vs {r['baseline_p50_ms']:.3f} ms"
                for r in found), details={"regressions": found})
    return {"model": spec.name, "workdir": str(workdir), "report": str(report_path(workdir, "benchmark")),
            "p50_ms": {n: {b: r["p50_ms"] for b, r in per.items()} for n, per in results.items()},
            "stable": report["stable"], "regressions": len(found)}
