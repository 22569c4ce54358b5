"""ORT FP32 vs torch eager, and ORT INT8 vs ORT FP32, for both reference models at batch 1 and 8.

    .venv/bin/python benchmarks/bench_variants.py [--window 50] [--max-windows 10] [--threads N]

Each model goes through the engine's own steps in a temporary work directory: convert (ONNX FP32), calibrate
(QDQ INT8), validate (parity + accuracy; a failing INT8 is reported, not fatal here), then all three runners are
timed together with the benchmark step's interleaved, windowed measurement. DigitsCNN is trained for a few seconds
on sklearn's digits so its accuracy is real (top-1 against held-out labels); TinyEncoder is random-init, so its
figure is top-1 agreement with torch eager on seeded inputs. Ratios are p50 speedups: > 1 means faster.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "include"))

from export_lib import runners, sampledata
from export_lib.benchmark import measure, summarize, thread_settings
from export_lib.calibrate import calibrate
from export_lib.config import BenchmarkSpec, ModelSpec
from export_lib.convert import convert
from export_lib.modelload import build_model, save_checkpoint
from export_lib.results import ValidationFailedError, read_json
from export_lib.select import select_variant
from export_lib.validate import validate
from export_lib.workdir import checkpoint_path, report_path, variant_model_path

BATCHES = (1, 8)
VARIANTS = ("onnx-fp32", "onnx-int8")


def digits(tmp: Path) -> tuple[ModelSpec, Any, str]:
    from model_zoo.digits import load_split, train_digits

    started = time.monotonic()
    model, acc, eval_arrays = train_digits(epochs=8, seed=0)
    x_train = load_split(0)[0]
    np.savez(tmp / "eval.npz", **eval_arrays)
    np.savez(tmp / "calib.npz", pixels=x_train[:256])
    spec = ModelSpec.model_validate({
        "name": "digits-cnn", "factory": "model_zoo.digits:DigitsCNN", "checkpoint": {"uri": str(tmp)},
        "inputs": [{"name": "pixels", "shape": ["batch", 1, 8, 8],
                    "dynamic": {"batch": {"min": 1, "opt": 8, "max": 64}},
                    "sample": {"kind": "uniform", "low": -1.0, "high": 1.0}}],
        "outputs": ["logits"], "variants": list(VARIANTS),
        # As in include/config/export.yaml: INT8 logits move by up to ~2 on a +-8 range while top-1 holds; the
        # elementwise bound catches a broken model, the accuracy gate decides.
        "tolerances": {"onnx-int8": {"atol": 1.0, "rtol": 0.25, "max_mismatch_fraction": 0.1}},
        "accuracy": {"metric": "top1_accuracy", "threshold": 0.9, "eval_data": str(tmp / "eval.npz")},
        "calibration": {"data": str(tmp / "calib.npz"), "samples": 256, "method": "minmax"},
    })
    return spec, model, f"trained {time.monotonic() - started:.1f} s, held-out top-1 {acc:.4f}"


def encoder(tmp: Path) -> tuple[ModelSpec, Any, str]:
    import torch

    from model_zoo.encoder import TinyEncoder

    torch.manual_seed(0)
    spec = ModelSpec.model_validate({
        "name": "tiny-encoder", "factory": "model_zoo.encoder:TinyEncoder", "checkpoint": {"uri": str(tmp)},
        "inputs": [
            {"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"],
             "dynamic": {"batch": {"min": 1, "opt": 8, "max": 64}, "seq": {"min": 4, "opt": 32, "max": 128}},
             "sample": {"kind": "randint", "low": 0, "high": 1000}},
            {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "seq"],
             "dynamic": {"batch": {"min": 1, "opt": 8, "max": 64}, "seq": {"min": 4, "opt": 32, "max": 128}},
             "sample": {"kind": "ones"}},
        ],
        "outputs": ["logits"], "variants": list(VARIANTS),
        "accuracy": {"metric": "top1_agreement", "threshold": 0.9},
        "validation": {"samples": 64, "extra_dims": {"seq": [16]}},
    })
    return spec, TinyEncoder().eval(), "random init"


def build(spec: ModelSpec, model: Any, work: Path) -> dict[str, Any]:
    """convert -> calibrate -> validate; returns the validation report (also when a variant failed)."""
    save_checkpoint(model, checkpoint_path(work, spec))
    convert(spec, checkpoint_path(work, spec), work)
    calib = spec.calibration.data
    calibrate(spec, work, None if calib == "generated" else Path(calib))
    try:
        validate(spec, work)
    except ValidationFailedError as e:
        print(f"  validation: {e}")
    return read_json(report_path(work, "validation"))


def time_variants(spec: ModelSpec, work: Path, settings: BenchmarkSpec, threads: int | None) -> dict[str, Any]:
    eager = runners.TorchRunner(build_model(spec, checkpoint_path(work, spec)), spec, threads)
    all_runners = {runners.EAGER: eager, **{v: runners.make_runner(v, variant_model_path(work, v), threads)
                                            for v in VARIANTS}}
    results: dict[str, dict[str, Any]] = {n: {} for n in all_runners}
    for b in BATCHES:
        feeds = sampledata.generate_inputs(spec, batch=b, seed=7)
        measured = measure({n: (lambda r=r, f=feeds: r(f)) for n, r in all_runners.items()}, settings)
        for n, m in measured.items():
            results[n][str(b)] = {**summarize(m["latencies_s"], b), "stable": m["stable"], "windows": m["windows"]}
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=int, default=50)
    parser.add_argument("--max-windows", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: library defaults)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    settings = BenchmarkSpec(batch_sizes=list(BATCHES), warmup=20, window=args.window, max_windows=args.max_windows)

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-variants-") as tmp:
        for make in (digits, encoder):
            sub = Path(tmp) / make.__name__
            sub.mkdir()
            spec, model, note = make(sub)
            print(f"{spec.name}: {note}; converting, calibrating, validating ...", flush=True)
            report = build(spec, model, sub / "work")
            started = time.monotonic()
            results = time_variants(spec, sub / "work", settings, args.threads)
            print(f"  timed in {time.monotonic() - started:.1f} s", flush=True)
            selection = select_variant(spec.variants, report, {"settings": settings.model_dump(), "results": results})
            rows.append((spec, report, results, selection))

    print(f"\nthreads: {thread_settings(args.threads)}")
    print("p50 latency (ms), interleaved windows of", args.window, "requests; ratio = p50 speedup (>1 = faster)\n")
    head = (f"{'model':<13} {'batch':>5} {'eager':>8} {'ort-fp32':>9} {'ort-int8':>9} {'FP32/eager':>11} "
            f"{'INT8/FP32':>10} {'stable':>7}")
    print(head)
    print("-" * len(head))
    for spec, _, results, _ in rows:
        for b in map(str, BATCHES):
            e, f, q = (results[n][b]["p50_ms"] for n in (runners.EAGER, *VARIANTS))
            stable = all(results[n][b]["stable"] for n in results)
            print(f"{spec.name:<13} {b:>5} {e:>8.3f} {f:>9.3f} {q:>9.3f} {e / f:>10.2f}x {f / q:>9.2f}x "
                  f"{'yes' if stable else 'no':>7}")
    print()
    for spec, report, _, selection in rows:
        acc = report["accuracy"]
        values = ", ".join(f"{k} {v:.4f}" for k, v in acc["values"].items())
        print(f"{spec.name}: {acc['metric']} on {acc['samples']} {acc['data']} samples: {values}")
        for v in VARIANTS:
            info = report["variants"][v]
            worst = max(info["outputs"].values(), key=lambda r: r["mismatch_fraction"])
            print(f"  {v}: validation {'passed' if info['passed'] else 'FAILED'}; max abs err "
                  f"{worst['max_abs_err']:.3g}, max rel err {worst['max_rel_err']:.3g}, mismatch "
                  f"{100 * worst['mismatch_fraction']:.2f}% (atol {worst['atol']:g}, rtol {worst['rtol']:g})")
        print(f"  select (batch {selection['batch_size']}): {selection['selected']}; "
              + "; ".join(f"{v}: {d['reason']}" for v, d in selection["decisions"].items() if not d["chosen"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
