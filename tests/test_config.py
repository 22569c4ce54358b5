"""The export config: errors name the field and the fix; digests identify a spec."""

from __future__ import annotations

import copy

import pytest

from export_lib.commands._common import with_variants
from export_lib.config import ConfigError, load_config, parse_config

BASE = {
    "models": [{
        "name": "digits-cnn",
        "factory": "model_zoo.digits:DigitsCNN",
        "checkpoint": {"uri": "s3://train-bucket/digits-cnn/"},
        "inputs": [{"name": "pixels", "shape": ["batch", 1, 8, 8],
                    "dynamic": {"batch": {"min": 1, "opt": 8, "max": 64}}}],
        "outputs": ["logits"],
    }]
}


def cfg(**model_overrides):
    data = copy.deepcopy(BASE)
    data["models"][0].update(model_overrides)
    return data


def test_minimal_config_gets_defaults():
    c = parse_config(cfg())
    m = c.model("digits-cnn")
    assert m.variants == ["onnx-fp32", "onnx-int8"]
    assert m.tolerance("onnx-fp32").atol == pytest.approx(1e-4)
    assert c.pipeline.schedule == "0 2 * * *"
    assert c.pipeline.steps["convert"].pool == "gpu-convert"
    assert m.inputs[0].concrete_shape("max") == [64, 1, 8, 8]
    assert m.inputs[0].concrete_shape(batch=3) == [3, 1, 8, 8]


def test_unknown_field_is_named():
    with pytest.raises(ConfigError) as e:
        parse_config(cfg(tolerence={"onnx-fp32": {"atol": 1, "rtol": 1}}))
    assert "models.0.tolerence: unknown field" in str(e.value)


def test_dynamic_dim_without_range_says_how_to_fix():
    with pytest.raises(ConfigError) as e:
        parse_config(cfg(inputs=[{"name": "x", "shape": ["batch", 3]}]))
    assert "dynamic dims ['batch'] need min/opt/max" in str(e.value)


@pytest.mark.parametrize(("override", "needle"), [
    ({"name": "Digits_CNN"}, "not a valid model name"),
    ({"factory": "model_zoo.digits.DigitsCNN"}, "package.module:callable"),
    ({"variants": ["onnx-int8"]}, "must include 'onnx-fp32'"),
    ({"variants": ["onnx-fp32", "tensorrt-int8"]}, "add 'onnx-int8'"),
    ({"variants": ["onnx-fp32", "coreml"]}, "variants.1"),
    ({"accuracy": {"metric": "top1_accuracy"}}, "needs accuracy.eval_data"),
    # both land in <workdir>/data/data.npz: calibrate would silently read the eval set (or the reverse)
    ({"calibration": {"data": "s3://b/calib/data.npz"}, "accuracy": {"eval_data": "s3://b/eval/data.npz"}},
     "same name"),
    ({"inputs": [{"name": "x", "shape": ["b"], "dynamic": {"b": {"min": 8, "opt": 4, "max": 16}}}]},
     "min <= opt <= max"),
])
def test_bad_model_fields(override, needle):
    with pytest.raises(ConfigError) as e:
        parse_config(cfg(**override))
    assert needle in str(e.value)


def test_duplicate_models_and_unknown_pool():
    data = cfg()
    data["models"].append(copy.deepcopy(data["models"][0]))
    with pytest.raises(ConfigError, match="duplicated: \\['digits-cnn'\\]"):
        parse_config(data)
    data = cfg()
    data["pipeline"] = {"steps": {"convert": {"pool": "gpu-huge"}}}
    with pytest.raises(ConfigError, match="pool 'gpu-huge' is not defined under kubernetes.pools"):
        parse_config(data)


def test_digest_is_stable_and_sensitive():
    a = parse_config(cfg()).model("digits-cnn")
    b = parse_config(cfg()).model("digits-cnn")
    c = parse_config(cfg(opset=18)).model("digits-cnn")
    assert a.digest() == b.digest()
    assert a.digest() != c.digest()


def test_variant_override():
    spec = parse_config(cfg(variants=["onnx-fp32", "onnx-int8"])).model("digits-cnn")
    only_fp32 = with_variants(spec, "onnx-fp32")
    assert only_fp32.variants == ["onnx-fp32"]
    assert only_fp32.digest() != spec.digest()
    assert with_variants(spec, "onnx-int8").variants == ["onnx-fp32", "onnx-int8"]
    with pytest.raises(ConfigError, match="not configured for model 'digits-cnn'"):
        with_variants(spec, "tensorrt-fp16")


def test_load_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- just a list\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="model 'nope' is not in the config"):
        parse_config(cfg()).model("nope")


def test_fp32_cannot_be_optional():
    with pytest.raises(ConfigError, match="'onnx-fp32' cannot be optional"):
        parse_config(cfg(validation={"optional_variants": ["onnx-fp32"]}))
