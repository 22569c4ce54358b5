"""Output parity between a reference (torch eager) and a variant: pure numpy, no runtime imports.

The rule (config.Tolerance): an element fails only if |got - ref| > atol AND |got - ref| > rtol * |ref|.
Plain `allclose(atol)` is wrong for large outputs (random-init logits of 1e12 differ by 1e5 at a relative error
of 4e-7), and plain rtol is wrong near zero; requiring both is right at both ends.

`compare` gives the figures for one batch, `combine` merges batches, `judge` decides against the tolerance and
phrases every failure with the output's name and the figures.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from export_lib.config import Tolerance


def compare(ref: np.ndarray, got: np.ndarray, tol: Tolerance) -> dict[str, Any]:
    """Figures for one output of one batch. Errors are measured where both sides are finite; an element that is
    NaN/Inf in the variant but finite in the reference counts as failing."""
    ref, got = np.asarray(ref), np.asarray(got)
    stats: dict[str, Any] = {
        "ref_shape": list(ref.shape), "shape": list(got.shape),
        "ref_dtype": str(ref.dtype), "dtype": str(got.dtype),
        "shape_match": ref.shape == got.shape,
        "elements": int(ref.size),
        "nan_count": int(np.isnan(got).sum()) if got.dtype.kind == "f" else 0,
        "inf_count": int(np.isinf(got).sum()) if got.dtype.kind == "f" else 0,
        "ref_nan_count": int(np.isnan(ref).sum()) if ref.dtype.kind == "f" else 0,
        "ref_inf_count": int(np.isinf(ref).sum()) if ref.dtype.kind == "f" else 0,
        "max_abs_err": 0.0, "max_rel_err": 0.0, "mismatch_count": 0,
    }
    if not stats["shape_match"]:
        stats["mismatch_count"] = int(ref.size)
        stats.update(degeneracy(ref))
        return stats
    r, g = ref.astype(np.float64), got.astype(np.float64)
    both = np.isfinite(r) & np.isfinite(g)
    diff = np.where(both, np.abs(g - r), 0.0)
    bad = both & (diff > tol.atol) & (diff > tol.rtol * np.abs(r))
    bad |= np.isfinite(r) & ~np.isfinite(g)
    # Relative error where the reference is non-zero (it is undefined at 0, where atol decides).
    nz = both & (r != 0)
    stats["max_abs_err"] = float(diff.max()) if diff.size else 0.0
    stats["max_rel_err"] = float((diff[nz] / np.abs(r[nz])).max()) if nz.any() else 0.0
    stats["mismatch_count"] = int(bad.sum())
    stats.update(degeneracy(ref))
    return stats


def degeneracy(ref: np.ndarray) -> dict[str, Any]:
    """Whether the reference output can show a difference at all: an all-zero or constant output, or one that
    is identical for every sample of the batch (does not depend on the input), makes parity prove nothing."""
    r = np.asarray(ref, dtype=np.float64)
    finite = r[np.isfinite(r)]
    if r.size == 0 or finite.size == 0:
        return {"degenerate": "empty or non-finite reference output"}
    if not finite.any():
        return {"degenerate": "all-zero reference output"}
    if finite.max() == finite.min():
        return {"degenerate": f"constant reference output ({finite.max():.6g})"}
    if r.ndim >= 1 and r.shape[0] > 1 and np.array_equal(r, np.broadcast_to(r[:1], r.shape)):
        return {"degenerate": "reference output identical for every sample (does not depend on the input)"}
    return {"degenerate": None}


def combine(parts: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Merge per-batch figures into one row: counts add up, maxima take the max, a shape mismatch anywhere stays."""
    parts = list(parts)
    if not parts:
        raise ValueError("nothing to combine")
    out = dict(parts[0])
    for p in parts[1:]:
        for k in ("elements", "nan_count", "inf_count", "ref_nan_count", "ref_inf_count", "mismatch_count"):
            out[k] += p[k]
        out["max_abs_err"] = max(out["max_abs_err"], p["max_abs_err"])
        out["max_rel_err"] = max(out["max_rel_err"], p["max_rel_err"])
        out["shape_match"] = out["shape_match"] and p["shape_match"]
        if not p["shape_match"] and out["shape"] == out["ref_shape"]:
            out["shape"], out["ref_shape"] = p["shape"], p["ref_shape"]
        if p["dtype"] != p["ref_dtype"]:
            out["dtype"], out["ref_dtype"] = p["dtype"], p["ref_dtype"]
    # Degenerate only if every batch was: one informative batch is enough for parity to mean something.
    out["degenerate"] = parts[0]["degenerate"] if all(p["degenerate"] for p in parts) else None
    return out


def judge(variant: str, output: str, stats: dict[str, Any], tol: Tolerance) -> dict[str, Any]:
    """stats + mismatch_fraction, the tolerance, `passed`, `reasons` (failures) and `warnings`."""
    row = dict(stats)
    row["mismatch_fraction"] = row["mismatch_count"] / row["elements"] if row["elements"] else 0.0
    row.update(atol=tol.atol, rtol=tol.rtol, max_mismatch_fraction=tol.max_mismatch_fraction)
    where = f"{variant} output '{output}'"
    reasons, warnings = [], []
    if not row["shape_match"]:
        reasons.append(f"{where}: shape {row['shape']} differs from the reference's {row['ref_shape']}")
    if row["ref_nan_count"] or row["ref_inf_count"]:
        reasons.append(f"{where}: the torch reference itself has {row['ref_nan_count']} NaN and "
                       f"{row['ref_inf_count']} Inf values; fix the model or checkpoint, parity is undefined")
    if row["nan_count"] > row["ref_nan_count"] or row["inf_count"] > row["ref_inf_count"]:
        reasons.append(f"{where}: {row['nan_count']} NaN and {row['inf_count']} Inf values "
                       f"(reference: {row['ref_nan_count']} NaN, {row['ref_inf_count']} Inf)")
    if row["shape_match"] and row["mismatch_fraction"] > tol.max_mismatch_fraction:
        reasons.append(
            f"{where}: {_pct(row['mismatch_fraction'])} of elements ({row['mismatch_count']}/{row['elements']}) "
            f"exceed atol={tol.atol:g} AND rtol={tol.rtol:g} (allowed: {_pct(tol.max_mismatch_fraction)}); "
            f"max abs err {row['max_abs_err']:.3g}, max rel err {row['max_rel_err']:.3g}")
    if row["dtype"] != row["ref_dtype"]:
        warnings.append(f"{where}: dtype {row['dtype']} vs reference {row['ref_dtype']} (compared as float64)")
    if row["degenerate"]:
        warnings.append(f"{where}: {row['degenerate']}: parity on it proves nothing; check the checkpoint "
                        "(random init?) or use real eval data")
    row.update(passed=not reasons, reasons=reasons, warnings=warnings)
    return row


def _pct(x: float) -> str:
    return f"{100 * x:.3g}%"
