"""The export configuration: one YAML file, validated with pydantic.

Light module: imported by the Airflow side (DAG parsing, operators), so it must not import torch/onnx.
Every model is a ``ModelSpec``; a user adds a model by adding an entry to the YAML, never by editing code.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

VARIANTS = ("onnx-fp32", "onnx-int8", "tensorrt-fp16", "tensorrt-int8")
Variant = Literal["onnx-fp32", "onnx-int8", "tensorrt-fp16", "tensorrt-int8"]
QUANTIZED_VARIANTS = frozenset({"onnx-int8", "tensorrt-int8"})
STEPS = ("sync", "convert", "calibrate", "validate", "benchmark", "select", "publish")

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,61}[a-z0-9]$")
_FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


class ConfigError(ValueError):
    """A configuration problem, phrased for the person who edits the YAML."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ----------------------------------------------------------------------------------------------- model spec
class DynamicDim(_Strict):
    """min/opt/max of one named dynamic dimension (TensorRT optimisation profile, benchmark and validation sizes)."""

    min: int = Field(ge=1)
    opt: int = Field(ge=1)
    max: int = Field(ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> DynamicDim:
        if not self.min <= self.opt <= self.max:
            raise ValueError(f"need min <= opt <= max, got min={self.min} opt={self.opt} max={self.max}")
        return self


class SampleSpec(_Strict):
    """How to generate seeded sample data for an input (used for validation and generated calibration)."""

    kind: Literal["normal", "uniform", "randint", "ones"] = "normal"
    mean: float = 0.0
    std: float = 1.0
    low: float = 0.0
    high: float = 1.0


class InputSpec(_Strict):
    name: str
    dtype: Literal["float32", "float16", "int64", "int32", "bool"] = "float32"
    # Each dim is a positive int (static) or a name (dynamic, must be in `dynamic`).
    shape: list[int | str] = Field(min_length=1)
    dynamic: dict[str, DynamicDim] = Field(default_factory=dict)
    sample: SampleSpec = Field(default_factory=SampleSpec)

    @model_validator(mode="after")
    def _dims(self) -> InputSpec:
        names = [d for d in self.shape if isinstance(d, str)]
        for d in self.shape:
            if isinstance(d, int) and d < 1:
                raise ValueError(f"input '{self.name}': static dim {d} must be >= 1")
        missing = [n for n in names if n not in self.dynamic]
        if missing:
            raise ValueError(
                f"input '{self.name}': dynamic dims {missing} need min/opt/max under `dynamic:` "
                f"(e.g. dynamic: {{{missing[0]}: {{min: 1, opt: 8, max: 64}}}})"
            )
        extra = [n for n in self.dynamic if n not in names]
        if extra:
            raise ValueError(f"input '{self.name}': `dynamic` names {extra} that are not in shape {self.shape}")
        return self

    def concrete_shape(self, which: Literal["min", "opt", "max"] = "opt", **override: int) -> list[int]:
        """The shape with every dynamic dim replaced by its min/opt/max (or an explicit override by name)."""
        out = []
        for d in self.shape:
            if isinstance(d, int):
                out.append(d)
            else:
                out.append(override.get(d, getattr(self.dynamic[d], which)))
        return out


class CheckpointSpec(_Strict):
    # s3://bucket/prefix/ under which training writes <step>/ folders, or a local directory.
    uri: str
    format: Literal["safetensors", "state_dict"] = "safetensors"
    filename: str = "model.safetensors"
    # Newest = highest step number in the folder name, or most recent LastModified.
    select: Literal["step", "time"] = "step"
    # A checkpoint folder is complete when this marker object exists; with `null`, when none of its objects
    # changed for `quiescence_seconds`.
    complete_marker: str | None = "_COMPLETE"
    quiescence_seconds: int = Field(default=600, ge=0)


class Tolerance(_Strict):
    # An element fails only if |a-b| > atol AND |a-b| > rtol*|ref| (both exceeded).
    atol: float = Field(ge=0)
    rtol: float = Field(ge=0)
    # Allowed fraction of failing elements (0 = none may fail).
    max_mismatch_fraction: float = Field(default=0.0, ge=0, le=1)


DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "onnx-fp32": Tolerance(atol=1e-4, rtol=1e-3),
    "tensorrt-fp16": Tolerance(atol=1e-2, rtol=1e-2),
    # INT8 parity is a sanity bound (a trained 10-class CNN's int8 logits drift by ~1-2.5 on values of ~±8);
    # the accuracy gate (accuracy.threshold) is what decides whether a quantized variant is good enough.
    "onnx-int8": Tolerance(atol=1.0, rtol=0.25, max_mismatch_fraction=0.1),
    "tensorrt-int8": Tolerance(atol=1.0, rtol=0.25, max_mismatch_fraction=0.1),
}


class AccuracySpec(_Strict):
    # top1_agreement: argmax of the variant equals argmax of torch eager; top1_accuracy: equals the labels.
    metric: Literal["top1_agreement", "top1_accuracy"] = "top1_agreement"
    threshold: float = Field(default=0.98, ge=0, le=1)
    output: str | None = None  # which output holds the logits (default: the first)
    # .npz with one array per input name (+ `labels` for top1_accuracy); s3:// is synced into <workdir>/data/.
    eval_data: str | None = None
    max_samples: int | None = Field(default=None, ge=1)


class CalibrationSpec(_Strict):
    # .npz with one array per input name, or `generated` (seeded samples from each input's `sample`).
    data: str = "generated"
    samples: int = Field(default=64, ge=1)
    method: Literal["minmax", "entropy", "percentile"] = "minmax"
    seed: int = 0
    per_channel: bool = True
    op_types: list[str] = Field(default_factory=lambda: ["Conv", "MatMul", "Gemm"])
    batch_size: int = Field(default=8, ge=1)


class ValidationSpec(_Strict):
    samples: int = Field(default=16, ge=1)
    seed: int = 1234
    # Sizes for each named dynamic dim to validate at besides `opt` (e.g. a batch other than the export size).
    extra_dims: dict[str, list[int]] = Field(default_factory=dict)
    # Strict by default: any failing variant fails the step. A variant listed here that fails is recorded as
    # rejected (report, selection reason) and the others go on, e.g. ship FP32 when INT8 drifts below threshold.
    optional_variants: list[Variant] = Field(default_factory=list)

    @field_validator("optional_variants")
    @classmethod
    def _fp32_required(cls, v: list[str]) -> list[str]:
        if "onnx-fp32" in v:
            raise ValueError("'onnx-fp32' cannot be optional: every other variant is built from it")
        return v


class BenchmarkSpec(_Strict):
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 8], min_length=1)
    warmup: int = Field(default=10, ge=0)
    window: int = Field(default=50, ge=1)  # requests per measurement window
    stability: float = Field(default=0.10, gt=0)  # 3 consecutive windows within this fraction
    max_windows: int = Field(default=10, ge=3)
    threads: int | None = Field(default=None, ge=1)  # intra-op threads; None = library default, recorded
    regression_threshold: float = Field(default=0.10, ge=0)  # flag p50 slower than baseline by more than this


class ModelSpec(_Strict):
    name: str
    factory: str  # package.module:callable returning an nn.Module
    factory_kwargs: dict[str, Any] = Field(default_factory=dict)
    checkpoint: CheckpointSpec
    inputs: list[InputSpec] = Field(min_length=1)
    outputs: list[str] = Field(min_length=1)
    opset: int = Field(default=20, ge=13, le=23)
    variants: list[Variant] = Field(default_factory=lambda: ["onnx-fp32", "onnx-int8"], min_length=1)
    tolerances: dict[Variant, Tolerance] = Field(default_factory=dict)
    accuracy: AccuracySpec = Field(default_factory=AccuracySpec)
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    validation: ValidationSpec = Field(default_factory=ValidationSpec)
    benchmark: BenchmarkSpec = Field(default_factory=BenchmarkSpec)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError(
                f"'{v}' is not a valid model name: use 2-63 lowercase letters, digits and '-' "
                "(it becomes an S3 prefix, a pod name and an Airflow map index label)"
            )
        return v

    @field_validator("factory")
    @classmethod
    def _factory(cls, v: str) -> str:
        if not _FACTORY_RE.match(v):
            raise ValueError(f"'{v}' is not an import path: write it as 'package.module:callable'")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> ModelSpec:
        names = [i.name for i in self.inputs]
        if len(set(names)) != len(names):
            raise ValueError(f"input names must be unique, got {names}")
        if len(set(self.outputs)) != len(self.outputs):
            raise ValueError(f"output names must be unique, got {self.outputs}")
        if "onnx-fp32" not in self.variants:
            raise ValueError("variants must include 'onnx-fp32': every other variant is built from it")
        if "tensorrt-int8" in self.variants and "onnx-int8" not in self.variants:
            raise ValueError("'tensorrt-int8' is built from the calibrated 'onnx-int8' model: add 'onnx-int8'")
        if self.accuracy.output is not None and self.accuracy.output not in self.outputs:
            raise ValueError(f"accuracy.output '{self.accuracy.output}' is not one of outputs {self.outputs}")
        if self.accuracy.metric == "top1_accuracy" and not self.accuracy.eval_data:
            raise ValueError("accuracy.metric 'top1_accuracy' needs accuracy.eval_data (an .npz with `labels`)")
        s3 = {u for u in (self.calibration.data, self.accuracy.eval_data) if u and u.startswith("s3://")}
        if len(s3) == 2 and len({u.rstrip("/").rsplit("/", 1)[-1] for u in s3}) == 1:
            raise ValueError(f"calibration.data and accuracy.eval_data are different files with the same name "
                             f"({sorted(s3)}): both would be synced to <workdir>/data/ under that name and one would "
                             "replace the other; rename one of them")
        return self

    def tolerance(self, variant: str) -> Tolerance:
        return self.tolerances.get(variant, DEFAULT_TOLERANCES[variant])  # type: ignore[index]

    def digest(self) -> str:
        """sha256 of the canonical JSON of this spec: a changed spec is a new version."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def data_uris(self) -> dict[str, str]:
        """Data files this model needs besides the checkpoint (role -> uri)."""
        out = {}
        if self.calibration.data != "generated":
            out["calibration"] = self.calibration.data
        if self.accuracy.eval_data:
            out["eval"] = self.accuracy.eval_data
        return out


# ------------------------------------------------------------------------------------------ pipeline / k8s
class Toleration(_Strict):
    key: str
    operator: Literal["Equal", "Exists"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None


class PodPool(_Strict):
    """A Kubernetes node pool a step runs on."""

    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    gpus: int = Field(default=0, ge=0)
    cpu: str = "2"
    memory: str = "8Gi"


class StepSettings(_Strict):
    pool: str = "cpu"  # key of kubernetes.pools
    use_gpu_pool: bool = False  # counts against the Airflow GPU pool (bounds concurrent GPU pods)
    timeout_minutes: int = Field(default=60, ge=1)
    retries: int = Field(default=2, ge=0)


def _default_steps() -> dict[str, StepSettings]:
    gpu = {"convert": "gpu-convert", "calibrate": "gpu-calibrate", "validate": "gpu-convert",
           "benchmark": "gpu-convert"}
    return {
        s: StepSettings(pool=gpu.get(s, "cpu"), use_gpu_pool=s in gpu,
                        timeout_minutes=120 if s in gpu else 30)
        for s in STEPS
    }


class KubernetesSettings(_Strict):
    namespace: str = "model-export"
    image: str = "ghcr.io/example/export-engine:latest"
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    service_account: str | None = "model-export"
    s3_secret: str | None = None  # secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY; None with IRSA
    s3_endpoint_url: str | None = None  # e.g. MinIO; None = AWS
    workspace_pvc: str = "model-export-workspace"
    workspace_mount: str = "/workspace"
    config_map: str = "model-export-config"
    config_mount: str = "/etc/model-export"
    pools: dict[str, PodPool] = Field(default_factory=lambda: {
        "cpu": PodPool(),
        "gpu-convert": PodPool(
            node_selector={"nvidia.com/gpu.product": "NVIDIA-A10G"}, gpus=1, cpu="4", memory="16Gi",
            tolerations=[Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")]),
        "gpu-calibrate": PodPool(
            node_selector={"nvidia.com/gpu.product": "NVIDIA-A10G"}, gpus=1, cpu="4", memory="16Gi",
            tolerations=[Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")]),
    })


class PipelineSettings(_Strict):
    schedule: str = "0 2 * * *"
    export_bucket: str = "model-exports"
    export_prefix: str = "exports"
    aws_conn_id: str = "aws_default"
    workspace: str = ".demo/workspace"  # relative paths are relative to the repository root
    gpu_pool: str = "gpu"
    gpu_pool_slots: int = Field(default=2, ge=1)
    steps: dict[str, StepSettings] = Field(default_factory=_default_steps)

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: dict[str, StepSettings]) -> dict[str, StepSettings]:
        unknown = sorted(set(v) - set(STEPS))
        if unknown:
            raise ValueError(f"unknown steps {unknown}; steps are {list(STEPS)}")
        return {**_default_steps(), **v}


class ExportConfig(_Strict):
    pipeline: PipelineSettings = Field(default_factory=PipelineSettings)
    kubernetes: KubernetesSettings = Field(default_factory=KubernetesSettings)
    models: list[ModelSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> ExportConfig:
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"model names must be unique, duplicated: {dupes}")
        for step, s in self.pipeline.steps.items():
            if s.pool not in self.kubernetes.pools:
                raise ValueError(
                    f"pipeline.steps.{step}.pool '{s.pool}' is not defined under kubernetes.pools "
                    f"(defined: {sorted(self.kubernetes.pools)})"
                )
        return self

    def model(self, name: str) -> ModelSpec:
        for m in self.models:
            if m.name == name:
                return m
        raise ConfigError(f"model '{name}' is not in the config; configured models: {[m.name for m in self.models]}")


# ---------------------------------------------------------------------------------------------------- load
def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"{source}: {err.error_count()} problem(s) in the export config:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  - {loc}: unknown field; remove it or check its spelling (see docs/model-config.md)")
        elif e["type"] == "missing":
            lines.append(f"  - {loc}: required field is missing")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"  - {loc}: {msg} (got {e.get('input')!r})" if e["type"] != "value_error"
                         else f"  - {loc}: {msg}")
    return "\n".join(lines)


def parse_config(data: Any, source: str = "<config>") -> ExportConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the export config must be a YAML mapping with a `models:` list")
    try:
        return ExportConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def load_config(path: str | Path) -> ExportConfig:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"export config '{p}' does not exist; pass --config or set EXPORT_CONFIG")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    return parse_config(data, str(p))
