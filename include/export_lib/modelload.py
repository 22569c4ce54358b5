"""Build a model from its factory and load its checkpoint, safely and strictly.

Checkpoints are data, never code: safetensors, or a torch state_dict read with `torch.load(weights_only=True)`,
which refuses pickled objects other than tensors and plain containers (their code never runs).
"""

from __future__ import annotations

import importlib
import logging
import pickle
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from export_lib.config import ModelSpec
from export_lib.results import BadInputError, atomic_write_bytes

log = logging.getLogger(__name__)

# Training scripts often save {"model": state_dict, "optimizer": ..., "step": ...}; take the weights from these keys.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")


def import_factory(path: str) -> Callable[..., Any]:
    """`package.module:callable` (the attribute may be dotted, e.g. `pkg.mod:Class.build`)."""
    module_name, _, attr = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise BadInputError(
            f"cannot import model factory '{path}': {type(e).__name__}: {e}. Put the module's directory on "
            "PYTHONPATH (or install its package) and check the spelling of `factory` in the export config"
        ) from None
    except Exception as e:  # SyntaxError, NameError, ... raised by the user's module while it is imported
        raise BadInputError(
            f"importing the module of model factory '{path}' failed: {type(e).__name__}: {e}{_where(e)}. Fix the "
            "module (it is your code, not the export config)"
        ) from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise BadInputError(
                f"model factory '{path}': module '{module_name}' has no attribute '{attr}'"
            ) from None
    if not callable(obj):
        raise BadInputError(f"model factory '{path}' is not callable (got {type(obj).__name__})")
    return obj


def _where(e: BaseException) -> str:
    """` (at file:line)` of the innermost frame of a user code failure, for the one-paragraph message."""
    if isinstance(e, SyntaxError) and e.filename:
        return f" (at {e.filename}:{e.lineno})"
    frames = traceback.extract_tb(e.__traceback__)
    return f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""


def instantiate(spec: ModelSpec) -> torch.nn.Module:
    factory = import_factory(spec.factory)
    try:
        model = factory(**spec.factory_kwargs)
    except TypeError as e:
        raise BadInputError(f"model factory '{spec.factory}' rejected factory_kwargs {spec.factory_kwargs}: {e}") \
            from None
    except Exception as e:  # the factory's own checks (ValueError, AssertionError, ...) reject the config
        raise BadInputError(
            f"model factory '{spec.factory}' raised {type(e).__name__}: {e}{_where(e)} when called with "
            f"factory_kwargs {spec.factory_kwargs}; fix factory_kwargs in the export config (or the factory)"
        ) from None
    if not isinstance(model, torch.nn.Module):
        raise BadInputError(f"model factory '{spec.factory}' returned {type(model).__name__}, not a torch.nn.Module")
    return model


def read_state_dict(path: Path, fmt: str) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file; any unreadable, truncated or code-carrying file is a BadInputError."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"checkpoint '{path}' does not exist (run `sync` first, or pass --checkpoint)")
    if fmt == "safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # SafetensorError, OSError, ...: all mean "not a readable safetensors file"
            raise BadInputError(
                f"checkpoint '{path}' is not a readable safetensors file (truncated or corrupt?): {e}"
            ) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refused a global: the file pickles objects other than tensors (possibly code).
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInputError(
            f"checkpoint '{path}' contains pickled objects other than tensors and was refused without running "
            f"them ({first}). Save only `model.state_dict()` (or use safetensors)"
        ) from None
    except Exception as e:  # truncated zip, not a torch file, ...
        raise BadInputError(
            f"checkpoint '{path}' is not a readable torch state_dict (truncated or corrupt?): {type(e).__name__}: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        ) from None
    return _unwrap(obj, path)


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and all(isinstance(v, torch.Tensor) for v in inner.values()):
                log.info("checkpoint %s: using the state_dict under key '%s'", path, key)
                return dict(inner)
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BadInputError(
            f"checkpoint '{path}' is not a state_dict (a mapping of parameter names to tensors); got "
            f"{type(obj).__name__}. Save `model.state_dict()`"
        )
    return dict(obj)


def check_keys(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Strict matching with every problem named: missing keys, unexpected keys, shape mismatches."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(
        f"{k}: checkpoint {list(state[k].shape)} vs model {list(expected[k].shape)}"
        for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    if not (missing or unexpected or shapes):
        return
    parts = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            shown = ", ".join(items[:10]) + (f", ... ({len(items) - 10} more)" if len(items) > 10 else "")
            parts.append(f"{label} ({len(items)}): {shown}")
    raise BadInputError(
        f"checkpoint '{source}' does not fit the model built by the factory (wrong architecture or "
        f"factory_kwargs?): " + "; ".join(parts),
        details={"missing": missing, "unexpected": unexpected, "shape_mismatches": shapes},
    )


def build_model(spec: ModelSpec, checkpoint_path: str | Path) -> torch.nn.Module:
    """The spec's model with the checkpoint's weights, in eval mode."""
    model = instantiate(spec)
    state = read_state_dict(Path(checkpoint_path), spec.checkpoint.format)
    check_keys(model, state, str(checkpoint_path))
    model.load_state_dict(state, strict=True)
    return model.eval()


def save_checkpoint(model_or_state: torch.nn.Module | Mapping[str, torch.Tensor], path: str | Path,
                    fmt: str = "safetensors") -> Path:
    """Write a checkpoint the way `build_model` reads it (demo, tests, training scripts); atomic."""
    state = model_or_state.state_dict() if isinstance(model_or_state, torch.nn.Module) else model_or_state
    # Cloned, contiguous tensors: safetensors refuses shared storage (tied weights).
    state = {k: v.detach().contiguous().clone() for k, v in state.items()}
    path = Path(path)
    if fmt == "safetensors":
        from safetensors.torch import save

        atomic_write_bytes(path, save(state))
    else:
        import io

        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write_bytes(path, buf.getvalue())
    return path


def flatten_outputs(out: Any) -> list[torch.Tensor]:
    """A model's return value as a flat list of tensors (the order the ONNX exporters use)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in flatten_outputs(v)]
    if isinstance(out, list | tuple):
        return [t for v in out for t in flatten_outputs(v)]
    raise TypeError(f"model returned {type(out).__name__}; expected tensors (or tuples/lists/dicts of tensors)")


def forward(model: torch.nn.Module, spec: ModelSpec, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """Run the torch model eagerly on numpy inputs -> {output name: numpy array}.

    Inputs are passed positionally in the config's order (the ONNX graph's input order), so config input names
    need not match the forward() parameter names.
    """
    import numpy as np

    args = [torch.from_numpy(np.ascontiguousarray(inputs[i.name])) for i in spec.inputs]
    with torch.inference_mode():
        outs = flatten_outputs(model(*args))
    if len(outs) != len(spec.outputs):
        raise BadInputError(
            f"model '{spec.name}' returns {len(outs)} output(s) but the config names {len(spec.outputs)}: "
            f"{spec.outputs}; list one name per returned tensor under `outputs:`"
        )
    return {name: t.detach().cpu().numpy() for name, t in zip(spec.outputs, outs, strict=True)}
