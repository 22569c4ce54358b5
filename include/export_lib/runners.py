"""One way to run each variant: `runner(feeds) -> {output name: array}`, plus what it ran on.

ONNX variants run through onnxruntime (CUDA EP when this onnxruntime has it, else CPU), TensorRT engines through
Polygraphy's TrtRunner, and the reference through torch eager. Validation and benchmark use the same runners, so
what is validated is what is timed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from export_lib.config import ModelSpec
from export_lib.modelload import forward
from export_lib.results import BadInputError, CapabilityMissingError

EAGER = "torch-eager"  # name of the reference "variant" in reports (same as export_lib.select.EAGER)


def cpu_info() -> dict[str, Any]:
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {"cpu_count": os.cpu_count(), "cpus_usable": affinity}


class OrtRunner:
    """An onnxruntime session; `threads` sets intra-op threads (0/None = onnxruntime's default, one per core)."""

    def __init__(self, model_path: Path, threads: int | None = None):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or 0
        opts.inter_op_num_threads = 1  # sequential executor: inter-op threads are unused; record it as such
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        providers = ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(model_path), sess_options=opts, providers=providers)
        except Exception as e:  # InvalidGraph, NoSuchFile, Fail: all mean the artifact is unusable
            raise BadInputError(f"onnxruntime cannot load '{model_path}': {type(e).__name__}: {e}") from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._threads = threads

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Only the graph's inputs: an exporter may drop an input the graph does not use.
        outs = self.session.run(None, {n: feeds[n] for n in self.input_names})
        return dict(zip(self.output_names, outs, strict=True))

    def describe(self) -> dict[str, Any]:
        return {
            "runtime": f"onnxruntime {ort.__version__}",
            "provider": self.session.get_providers()[0],
            "providers": self.session.get_providers(),
            "intra_op_threads": self._threads or "default (0: one per physical core)",
            "inter_op_threads": 1,
            "execution_mode": "sequential",
            **cpu_info(),
        }


class TensorRTRunner:
    """A serialized TensorRT engine (model.plan) run through Polygraphy's TrtRunner."""

    def __init__(self, engine_path: Path):
        try:
            import tensorrt as trt
        except ImportError as e:
            raise CapabilityMissingError(
                f"TensorRT is not importable here ({e}); run tensorrt-* variants on a GPU node with TensorRT "
                "(the engine image's GPU pool), or drop them from `variants`"
            ) from None
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        self._trt_version = trt.__version__
        self._runner = TrtRunner(EngineFromBytes(Path(engine_path).read_bytes()))
        self._runner.activate()
        engine = self._runner.engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self._runner.infer({n: np.ascontiguousarray(feeds[n]) for n in self.input_names})
        return {n: np.asarray(outs[n]) for n in self.output_names}

    def describe(self) -> dict[str, Any]:
        return {"runtime": f"tensorrt {self._trt_version} (polygraphy TrtRunner)", "provider": "TensorRT",
                **cpu_info()}

    def close(self) -> None:
        self._runner.deactivate()


class TorchRunner:
    """Torch eager: the reference, run exactly as convert ran it before export (modelload.forward)."""

    def __init__(self, model: torch.nn.Module, spec: ModelSpec, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)  # process-wide: benchmark sets the same count for every runner
        self.model, self.spec = model.eval(), spec
        self.input_names = [i.name for i in spec.inputs]
        self.output_names = list(spec.outputs)

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return forward(self.model, self.spec, feeds)

    def describe(self) -> dict[str, Any]:
        return {"runtime": f"torch {torch.__version__} eager", "provider": "torch-cpu",
                "intra_op_threads": torch.get_num_threads(), "inter_op_threads": torch.get_num_interop_threads(),
                **cpu_info()}


def make_runner(variant: str, model_path: Path, threads: int | None = None) -> OrtRunner | TensorRTRunner:
    if variant.startswith("tensorrt-"):
        return TensorRTRunner(model_path)
    return OrtRunner(model_path, threads)


def close(runner: Any) -> None:
    if hasattr(runner, "close"):
        runner.close()
