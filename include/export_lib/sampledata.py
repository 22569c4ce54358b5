"""Sample inputs for a model: seeded generated batches (from each input's `sample`) or arrays from an .npz.

Arrays are keyed by input name. The leading dim of every input is the batch; a dynamic dim takes its `opt`
size unless overridden by name (`dims`) or, for the leading dim, by `batch`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from export_lib.config import InputSpec, ModelSpec
from export_lib.results import BadInputError

_INT_DTYPES = ("int64", "int32", "bool")


def batch_dim_name(spec: ModelSpec) -> str | None:
    """Name of the dynamic leading (batch) dim shared by the inputs, or None when the batch is static."""
    names = {i.shape[0] for i in spec.inputs if isinstance(i.shape[0], str)}
    return names.pop() if len(names) == 1 else None


def input_shape(inp: InputSpec, batch: int | None = None, dims: Mapping[str, int] | None = None) -> list[int]:
    """Concrete shape: named dims from `dims`, else the leading dim from `batch`, else each dynamic dim's opt."""
    override = dict(dims or {})
    lead = inp.shape[0]
    if batch is not None:
        if isinstance(lead, str):
            override.setdefault(lead, batch)
        elif lead != batch:
            raise BadInputError(
                f"input '{inp.name}' has a static batch dim {lead}; batch {batch} cannot be generated "
                f"(make the dim dynamic in the config, e.g. shape: [batch, ...] with dynamic.batch min/opt/max)"
            )
    return inp.concrete_shape("opt", **{k: v for k, v in override.items() if k in inp.dynamic})


def _sample(inp: InputSpec, shape: list[int], rng: np.random.Generator) -> np.ndarray:
    s = inp.sample
    if s.kind == "ones":
        return np.ones(shape, dtype=inp.dtype)
    if s.kind == "randint":
        # numpy convention: `high` is exclusive (token ids: low 0, high vocab size).
        high = max(int(s.high), int(s.low) + 1)
        return rng.integers(int(s.low), high, size=shape).astype(inp.dtype)
    if inp.dtype in _INT_DTYPES:
        raise BadInputError(
            f"input '{inp.name}' is {inp.dtype} but sample.kind is '{s.kind}' (floats): set sample.kind to "
            "'randint' (with low/high, high exclusive) or 'ones' (e.g. an attention mask)"
        )
    if s.kind == "normal":
        return rng.normal(s.mean, s.std, size=shape).astype(inp.dtype)
    return rng.uniform(s.low, s.high, size=shape).astype(inp.dtype)


def _generate(spec: ModelSpec, rng: np.random.Generator, batch: int | None,
              dims: Mapping[str, int] | None) -> dict[str, np.ndarray]:
    return {inp.name: _sample(inp, input_shape(inp, batch, dims), rng) for inp in spec.inputs}


def generate_inputs(spec: ModelSpec, batch: int | None = None, seed: int = 0,
                    dims: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """One seeded batch following each input's sample spec and dtype (same arguments -> same arrays)."""
    return _generate(spec, np.random.default_rng(seed), batch, dims)


def generate_batches(spec: ModelSpec, n_samples: int, batch_size: int, seed: int,
                     dims: dict[str, int] | None = None) -> list[dict[str, np.ndarray]]:
    """`n_samples` seeded samples in batches of `batch_size` (the last may be smaller).

    With a static batch dim every batch has that size and `batch_size` is ignored.
    """
    rng = np.random.default_rng(seed)
    static = None if batch_dim_name(spec) else int(spec.inputs[0].shape[0])
    out, left = [], n_samples
    while left > 0:
        b = static or min(batch_size, left)
        out.append(_generate(spec, rng, None if static else b, dims))
        left -= b
    return out


def load_npz(path: str | Path, spec: ModelSpec) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Arrays for every input (+ `labels` when present) from an .npz, checked against the spec.

    Pickled object arrays are refused (allow_pickle=False): data files must not carry code.
    """
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"data file '{path}' does not exist")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as e:  # BadZipFile, ValueError (object arrays), OSError ...
        raise BadInputError(f"data file '{path}' is not a readable .npz of plain arrays: {type(e).__name__}: {e}") \
            from None
    inputs: dict[str, np.ndarray] = {}
    n = None
    for inp in spec.inputs:
        if inp.name not in arrays:
            raise BadInputError(
                f"data file '{path}' has no array for input '{inp.name}' (arrays: {sorted(arrays)}); "
                f"save it with np.savez(path, {inp.name}=..., ...)"
            )
        inputs[inp.name] = _check_array(arrays[inp.name], inp, path)
        if n is None:
            n = inputs[inp.name].shape[0]
        elif inputs[inp.name].shape[0] != n:
            raise BadInputError(
                f"data file '{path}': input '{inp.name}' has {inputs[inp.name].shape[0]} samples, "
                f"'{spec.inputs[0].name}' has {n}"
            )
    if not n:
        raise BadInputError(f"data file '{path}' holds no samples (input '{spec.inputs[0].name}' has shape "
                            f"{list(inputs[spec.inputs[0].name].shape)}); write at least one sample into it")
    labels = arrays.get("labels")
    if labels is not None:
        if labels.ndim != 1 or labels.shape[0] != n or labels.dtype.kind not in "iu":
            raise BadInputError(
                f"data file '{path}': `labels` must be a 1-D integer array with one entry per sample ({n}), "
                f"got shape {list(labels.shape)} dtype {labels.dtype}"
            )
        labels = labels.astype(np.int64)
    return inputs, labels


def _check_array(a: np.ndarray, inp: InputSpec, path: Path) -> np.ndarray:
    want = np.dtype(inp.dtype)
    if a.dtype != want and not np.can_cast(a.dtype, want, casting="same_kind"):
        raise BadInputError(
            f"data file '{path}': input '{inp.name}' has dtype {a.dtype}, the config says {inp.dtype}"
        )
    if a.ndim != len(inp.shape):
        raise BadInputError(
            f"data file '{path}': input '{inp.name}' has shape {list(a.shape)}, the config says {inp.shape} "
            f"(rank {a.ndim} vs {len(inp.shape)})"
        )
    for axis, (got, dim) in enumerate(zip(a.shape, inp.shape, strict=True)):
        if axis == 0 and isinstance(dim, str):
            continue  # the sample count; batches are cut from it
        if isinstance(dim, int) and got != dim:
            raise BadInputError(
                f"data file '{path}': input '{inp.name}' has shape {list(a.shape)}, the config says "
                f"{inp.shape} (axis {axis}: {got} != {dim})"
            )
        if isinstance(dim, str) and not inp.dynamic[dim].min <= got <= inp.dynamic[dim].max:
            r = inp.dynamic[dim]
            raise BadInputError(
                f"data file '{path}': input '{inp.name}' axis {axis} ('{dim}') is {got}, outside the configured "
                f"range [{r.min}, {r.max}]"
            )
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        bad = int((~np.isfinite(a)).sum())
        raise BadInputError(
            f"data file '{path}': input '{inp.name}' holds {bad} NaN/Inf value(s); clean the data set (parity and "
            "accuracy on non-finite inputs say nothing about the model)"
        )
    return a.astype(want, copy=False)


def split_batches(inputs: Mapping[str, np.ndarray], batch_size: int,
                  limit: int | None = None) -> list[dict[str, np.ndarray]]:
    """Cut arrays sharing a leading sample axis into batches (the first `limit` samples when given)."""
    n = next(iter(inputs.values())).shape[0]
    n = n if limit is None else min(n, limit)
    return [{k: v[i:i + batch_size] for k, v in inputs.items()} for i in range(0, n, batch_size)]


def to_torch(inputs: Mapping[str, np.ndarray]) -> dict:
    """numpy arrays -> torch tensors (same names; copies, so the arrays stay independent)."""
    import torch

    return {k: torch.from_numpy(np.ascontiguousarray(v).copy()) for k, v in inputs.items()}
