"""benchmark: the measurement loop with a deterministic fake clock (pure), regressions, and one real quick run
of validate -> benchmark -> select through the CLI on a tiny CNN."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from validate_helpers import MODEL, build_workdir

from export_lib.benchmark import is_stable, load_baseline, measure, regressions, round_order, summarize
from export_lib.config import BenchmarkSpec, load_config
from export_lib.results import BadInputError, ExitCode, read_json, write_json
from export_lib.validate import validate
from export_lib.workdir import report_path


class FakeClock:
    """Time advances only when a fake request runs: request `name` takes the next duration of its schedule."""

    def __init__(self, schedules):
        self.now, self.calls = 0.0, []
        self._schedules = {n: iter(s) for n, s in schedules.items()}

    def __call__(self):
        return self.now

    def request(self, name):
        def run():
            self.calls.append(name)
            self.now += next(self._schedules[name])
        return run


def _constant(x):
    while True:
        yield x


def _alternating(a, b, every):
    i = 0
    while True:
        yield a if (i // every) % 2 == 0 else b
        i += 1


def test_stable_runners_stop_after_three_windows_interleaved():
    clock = FakeClock({"a": _constant(0.001), "b": _constant(0.002)})
    settings = BenchmarkSpec(warmup=1, window=2, max_windows=10, stability=0.1)
    out = measure({"a": clock.request("a"), "b": clock.request("b")}, settings, timer=clock)
    # warm-up a, b; then windows of 2 requests, round-robin with the first runner rotating.
    assert clock.calls == ["a", "b", "a", "a", "b", "b", "b", "b", "a", "a", "a", "a", "b", "b"]
    assert out["a"]["windows"] == 3 and out["a"]["stable"] and out["b"]["stable"]
    assert out["a"]["latencies_s"] == pytest.approx([0.001] * 6)
    assert out["b"]["window_means_s"] == pytest.approx([0.002] * 3)


def test_unstable_runner_keeps_everyone_measuring_until_max_windows():
    # b alternates 1 ms / 3 ms per window: never 3 windows within 10 %.
    clock = FakeClock({"a": _constant(0.001), "b": _alternating(0.001, 0.003, every=4)})
    settings = BenchmarkSpec(warmup=0, window=4, max_windows=5, stability=0.1)
    out = measure({"a": clock.request("a"), "b": clock.request("b")}, settings, timer=clock)
    assert out["a"]["windows"] == out["b"]["windows"] == 5
    assert out["a"]["stable"] and not out["b"]["stable"]
    assert len(out["b"]["latencies_s"]) == 12  # the last 3 windows


def test_stability_rule_and_order():
    assert is_stable([5.0, 1.0, 1.0, 1.05], 0.1)
    assert not is_stable([1.0, 1.0, 1.5], 0.1)
    assert not is_stable([1.0, 1.0], 0.1)
    assert round_order(["a", "b", "c"], 4) == ["b", "c", "a"]


def test_summary_figures():
    s = summarize([0.001] * 99 + [0.011], batch_size=8)
    assert s["p50_ms"] == pytest.approx(1.0) and s["p99_ms"] > 1.0 and s["requests"] == 100
    assert s["throughput_per_s"] == pytest.approx(8 / 0.0011)


def test_regressions_against_a_manifest_baseline(tmp_path):
    results = {"onnx-fp32": {"1": {"p50_ms": 1.25}, "8": {"p50_ms": 2.0}}, "onnx-int8": {"1": {"p50_ms": 1.0}}}
    manifest = tmp_path / "manifest.json"
    write_json(manifest, {"model": MODEL, "benchmark": {"results": {"onnx-fp32": {"1": {"p50_ms": 1.0},
                                                                                  "8": {"p50_ms": 1.9}}}}})
    found = regressions(results, load_baseline(manifest), threshold=0.1)
    assert found == [{"variant": "onnx-fp32", "batch_size": 1, "p50_ms": 1.25, "baseline_p50_ms": 1.0,
                      "slower_by": pytest.approx(0.25), "threshold": 0.1}]
    write_json(tmp_path / "other.json", {"model": MODEL})
    with pytest.raises(BadInputError, match="has no benchmark results"):
        load_baseline(tmp_path / "other.json")


def _cli(step, config, workdir, *extra):
    return subprocess.run([sys.executable, "-m", "export_lib", step, "--config", str(config), "--model", MODEL,
                           "--workdir", str(workdir), *extra], capture_output=True, text=True, timeout=300)


def test_real_benchmark_and_select_through_the_cli(tmp_path):
    config, workdir = build_workdir(tmp_path, ["onnx-fp32", "onnx-int8"])
    proc = _cli("benchmark", config, workdir)
    assert proc.returncode == ExitCode.BAD_INPUT and "run `validate`" in proc.stderr
    validate(load_config(config).model(MODEL), workdir)

    proc = _cli("benchmark", config, workdir)
    assert proc.returncode == 0, proc.stderr
    report = read_json(report_path(workdir, "benchmark"))
    assert set(report["results"]) == {"torch-eager", "onnx-fp32", "onnx-int8"}
    for per_batch in report["results"].values():
        assert set(per_batch) == {"1", "4"}
        for r in per_batch.values():
            assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p95_ms"] <= r["p99_ms"] and r["throughput_per_s"] > 0
            assert 3 <= r["windows"] <= 4 and isinstance(r["stable"], bool)
    assert report["ratios"]["onnx-int8"]["4"]["fp_counterpart"] == "onnx-fp32"
    assert report["ratios"]["onnx-fp32"]["1"]["speedup_vs_eager"] > 0
    assert report["threads"]["torch_num_threads"] >= 1 and report["runners"]["onnx-fp32"]["provider"]

    # Against itself made 10x faster, everything regressed: recorded, exit 3 only when asked.
    baseline = tmp_path / "baseline.json"
    fast = {v: {b: {"p50_ms": r["p50_ms"] / 10} for b, r in per.items()} for v, per in report["results"].items()}
    write_json(baseline, {"results": fast})
    proc = _cli("benchmark", config, workdir, "--baseline", str(baseline))
    assert proc.returncode == 0, proc.stderr
    assert len(read_json(report_path(workdir, "benchmark"))["regressions"]) == 4
    proc = _cli("benchmark", config, workdir, "--baseline", str(baseline), "--fail-on-regression")
    assert proc.returncode == ExitCode.VALIDATION_FAILED and "regression" in proc.stderr

    proc = _cli("select", config, workdir)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((workdir / "results" / "select.json").read_text())
    selection = read_json(report_path(workdir, "selection"))
    assert result["selected"] == selection["selected"] in {"onnx-fp32", "onnx-int8"}
    assert selection["batch_size"] == 4
    assert all(d["reason"] for d in selection["decisions"].values())
