"""TensorRT engines from ONNX through Polygraphy: FP16 from the fp32 model, INT8 from the calibrated QDQ model.

INT8 is explicit quantization: the Q/DQ nodes carry the scales, so the builder gets the INT8 flag and no
calibrator. Each dynamic input gets an optimisation profile from its min/opt/max dims.

Everything that does not need TensorRT (profiles, flags, workspace size) is a pure function, testable anywhere;
TensorRT itself (and polygraphy's TensorRT backend, which imports it lazily) is only touched in `build_engine`,
`run_engine` and `require_tensorrt`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from export_lib.config import ModelSpec
from export_lib.results import BadInputError, CapabilityMissingError

log = logging.getLogger(__name__)

GIB = 1 << 30
HOW_TO_GET_TENSORRT = (
    "tensorrt-* variants need TensorRT and a CUDA GPU: run the step in the GPU engine image (kubernetes runtime, "
    "a `gpu-*` pool), or on a CUDA machine `pip install tensorrt --extra-index-url https://pypi.nvidia.com` "
    "(NVIDIA's index); or build only the ONNX variants with --variants onnx-fp32,onnx-int8"
)


# ------------------------------------------------------------------------------------------ pure functions
def profile_shapes(spec: ModelSpec) -> dict[str, tuple[list[int], list[int], list[int]]]:
    """One optimisation profile: input name -> (min, opt, max) shapes from each dynamic dim's min/opt/max."""
    return {i.name: (i.concrete_shape("min"), i.concrete_shape("opt"), i.concrete_shape("max")) for i in spec.inputs}


def builder_flags(variant: str) -> dict[str, bool]:
    """CreateConfig flags per variant. INT8 keeps FP16 on so layers left unquantized need not run in FP32."""
    if variant == "tensorrt-fp16":
        return {"fp16": True, "int8": False}
    if variant == "tensorrt-int8":
        return {"fp16": True, "int8": True}
    raise ValueError(f"'{variant}' is not a TensorRT variant (tensorrt-fp16, tensorrt-int8)")


def source_variant(variant: str) -> str:
    """The ONNX variant a TensorRT variant is built from."""
    return {"tensorrt-fp16": "onnx-fp32", "tensorrt-int8": "onnx-int8"}[variant]


def workspace_bytes(total_gpu_memory: int | None, fraction: float = 0.5, cap: int = 4 * GIB,
                    floor: int = 256 << 20) -> int:
    """Builder workspace: a fraction of the GPU's memory, capped (tactics rarely gain beyond a few GiB) and
    with a floor so small GPUs still get usable tactics; `cap` when the memory size is unknown."""
    if not total_gpu_memory:
        return cap
    return int(max(floor, min(cap, total_gpu_memory * fraction)))


# -------------------------------------------------------------------------------------------- TensorRT
def require_tensorrt() -> Any:
    """The tensorrt module, or CapabilityMissingError saying it is absent and how to get it."""
    try:
        import tensorrt as trt
    except Exception as e:  # ImportError, or a broken install (missing CUDA libraries)
        raise CapabilityMissingError(
            f"TensorRT is not installed here (import tensorrt failed: {type(e).__name__}: {e}). {HOW_TO_GET_TENSORRT}"
        ) from None
    return trt


def _gpu_memory() -> int | None:
    try:
        import torch

        return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
    except Exception:  # a CPU-only torch: the builder finds out for itself
        return None


def build_engine(onnx_path: Path, spec: ModelSpec, variant: str, out_path: Path) -> dict[str, Any]:
    """Build and serialize one engine to `out_path` (the caller stages it in a temporary directory)."""
    trt = require_tensorrt()
    from polygraphy.backend.trt import (
        CreateConfig,
        Profile,
        engine_from_network,
        network_from_onnx_path,
        save_engine,
    )

    flags = builder_flags(variant)
    shapes = profile_shapes(spec)
    profile = Profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.add(name, min=lo, opt=opt, max=hi)
    workspace = workspace_bytes(_gpu_memory())
    config = CreateConfig(**flags, profiles=[profile],
                          memory_pool_limits={trt.MemoryPoolType.WORKSPACE: workspace})
    log.info("building %s from %s (flags %s, profile %s, workspace %d MiB)", variant, onnx_path, flags, shapes,
             workspace >> 20)
    started = time.monotonic()
    try:
        engine = engine_from_network(network_from_onnx_path(str(onnx_path)), config=config)
    except Exception as e:  # polygraphy raises PolygraphyException with the parser/builder log
        raise BadInputError(f"TensorRT could not build {variant} from '{onnx_path}': {e}") from None
    if engine is None:
        raise BadInputError(f"TensorRT could not build {variant} from '{onnx_path}' (see the builder log above)")
    save_engine(engine, path=str(out_path))
    return {"variant": variant, "flags": flags, "profile": {k: list(v) for k, v in shapes.items()},
            "workspace_bytes": workspace, "tensorrt": trt.__version__,
            "build_seconds": round(time.monotonic() - started, 3)}


def run_engine(engine_path: Path, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a serialized engine once (validation/benchmark helpers and the GPU test); outputs by name."""
    require_tensorrt()
    from polygraphy.backend.common import bytes_from_path
    from polygraphy.backend.trt import TrtRunner, engine_from_bytes

    engine = engine_from_bytes(bytes_from_path(str(engine_path)))
    with TrtRunner(engine) as runner:
        out = runner.infer(feed_dict=dict(inputs))
    return {k: np.asarray(v) for k, v in out.items()}
