"""The validation table as a great-expectations suite, run in an ephemeral context (nothing written to disk by GX).

GX re-checks the decisions of `parity.judge` from the table alone, so the kept result (reports/gx_result.json)
is evidence a reader can verify without our code. Per variant and output: mismatch_fraction <= the variant's
max_mismatch_fraction (the atol-AND-rtol rule, already applied per element), no NaN/Inf beyond the reference's,
shapes equal; per gated (quantized) variant: accuracy >= the threshold. max_abs_err is deliberately not bounded by
atol: on large outputs it legitimately exceeds atol where rtol covers it.

great_expectations is imported inside the function: importing it takes seconds.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

PARITY_COLUMNS = ("variant", "output", "max_abs_err", "max_rel_err", "mismatch_fraction", "max_mismatch_fraction",
                  "nan_count", "inf_count", "ref_nan_count", "ref_inf_count", "shape_match")


def run_suite(parity_rows: Sequence[dict[str, Any]], accuracy_rows: Sequence[dict[str, Any]],
              suite_name: str) -> dict[str, Any]:
    """parity_rows: PARITY_COLUMNS per (variant, output); accuracy_rows: {variant, accuracy, threshold} for each
    gated variant. Returns {success, statistics, results: [{expectation, column, variant, success, observed}]}."""
    _quiet_loggers()
    import great_expectations as gx
    import pandas as pd

    _quiet_loggers()  # again: GX sets INFO on some of its own loggers while importing

    context = gx.get_context(mode="ephemeral")
    _quiet(context)
    source = context.data_sources.add_pandas("validation")
    results: list[dict[str, Any]] = []
    success = True
    tables = [("parity", pd.DataFrame([{c: r[c] for c in PARITY_COLUMNS} for r in parity_rows]),
               _parity_expectations(gx, parity_rows))]
    if accuracy_rows:
        tables.append(("accuracy", pd.DataFrame(list(accuracy_rows)), _accuracy_expectations(gx, accuracy_rows)))
    for table, frame, expectations in tables:
        suite = context.suites.add(gx.ExpectationSuite(name=f"{suite_name}-{table}", expectations=expectations))
        batch = source.add_dataframe_asset(table).add_batch_definition_whole_dataframe("all").get_batch(
            batch_parameters={"dataframe": frame})
        outcome = batch.validate(suite)
        success = success and bool(outcome.success)
        for r in outcome.results:
            cfg = r.expectation_config
            results.append({
                "table": table,
                "expectation": cfg.type,
                "column": cfg.kwargs.get("column") or f"{cfg.kwargs.get('column_A')} >= {cfg.kwargs.get('column_B')}",
                "variant": (cfg.meta or {}).get("variant"),
                "bounds": {k: cfg.kwargs.get(k) for k in ("min_value", "max_value", "value_set") if k in cfg.kwargs},
                "success": bool(r.success),
                "unexpected": (r.result or {}).get("partial_unexpected_list", []),
                "exception": (r.exception_info or {}).get("exception_message"),
            })
    return {
        "success": success,
        "great_expectations_version": gx.__version__,
        "statistics": {"evaluated": len(results), "successful": sum(r["success"] for r in results)},
        "results": results,
    }


def _quiet_loggers() -> None:
    for name in ["great_expectations", *logging.root.manager.loggerDict]:
        if name.startswith("great_expectations"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _quiet(context: Any) -> None:
    """Turn off GX's per-metric tqdm progress bars (they flood the step's log)."""
    try:
        from great_expectations.data_context.types.base import ProgressBarsConfig

        context.variables.progress_bars = ProgressBarsConfig(globally=False)
    except (ImportError, AttributeError):
        pass  # cosmetic only


def _by_variant(gx: Any, column: str, variant: str, **bounds: Any) -> Any:
    from great_expectations.expectations.row_conditions import Column

    return gx.expectations.ExpectColumnValuesToBeBetween(
        column=column, row_condition=Column("variant") == variant, meta={"variant": variant}, **bounds)


def _parity_expectations(gx: Any, rows: Sequence[dict[str, Any]]) -> list[Any]:
    out = []
    for variant in dict.fromkeys(r["variant"] for r in rows):  # ordered, unique
        limit = next(r["max_mismatch_fraction"] for r in rows if r["variant"] == variant)
        out.append(_by_variant(gx, "mismatch_fraction", variant, min_value=0.0, max_value=limit))
    # Non-finite values only where the reference has them too (the reference having any fails in parity).
    out.append(gx.expectations.ExpectColumnPairValuesAToBeGreaterThanB(
        column_A="ref_nan_count", column_B="nan_count", or_equal=True))
    out.append(gx.expectations.ExpectColumnPairValuesAToBeGreaterThanB(
        column_A="ref_inf_count", column_B="inf_count", or_equal=True))
    out.append(gx.expectations.ExpectColumnValuesToBeBetween(column="ref_nan_count", min_value=0, max_value=0))
    out.append(gx.expectations.ExpectColumnValuesToBeBetween(column="ref_inf_count", min_value=0, max_value=0))
    out.append(gx.expectations.ExpectColumnValuesToBeInSet(column="shape_match", value_set=[True]))
    return out


def _accuracy_expectations(gx: Any, rows: Sequence[dict[str, Any]]) -> list[Any]:
    return [_by_variant(gx, "accuracy", r["variant"], min_value=r["threshold"], max_value=1.0) for r in rows]
