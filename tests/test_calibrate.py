"""calibrate: INT8 QDQ over all configured samples, real accuracy on digits, attention masks, fallbacks."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export_lib import calibrate as cal
from export_lib import convert as conv
from export_lib import modelload
from export_lib.results import BadInputError, ExitCode
from model_zoo.digits import train_digits
from model_zoo.encoder import TinyEncoder
from tests._engine_helpers import digits_spec, encoder_spec, run_cli, spec_of, write_config, write_module

FINFO_MASK = """
    import torch

    class HfStyle(torch.nn.Module):
        '''Masks with finfo.min like Hugging Face models: Entropy calibration cannot histogram that range.'''
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(50, 16)
            self.q = torch.nn.Linear(16, 16)
            self.out = torch.nn.Linear(16, 3)
        def forward(self, input_ids, attention_mask):
            x = self.emb(input_ids)
            bias = (1.0 - attention_mask.to(x.dtype))[:, None, :] * torch.finfo(torch.float32).min
            attn = torch.softmax(self.q(x) @ x.transpose(1, 2) + bias, -1) @ x
            return self.out(attn.mean(1))
"""


def _top1(path, pixels):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"pixels": pixels})[0].argmax(1)


@pytest.fixture(scope="module")
def trained_digits():
    return train_digits(epochs=4, seed=0)


def test_digits_int8_keeps_accuracy_with_npz_calibration(tmp_path, trained_digits):
    model, fp32_accuracy, arrays = trained_digits
    np.savez(tmp_path / "eval.npz", **arrays)
    spec = spec_of(digits_spec(tmp_path / "ckpt", calibration={"data": "eval.npz", "samples": 96,
                                                               "batch_size": 32, "method": "percentile"}))
    ckpt = modelload.save_checkpoint(model, tmp_path / "ckpt" / "model.safetensors")
    work = tmp_path / "work"
    conv.convert(spec, ckpt, work)
    result = cal.calibrate(spec, work, tmp_path / "eval.npz")
    assert result["samples"] == 96 and result["batches"] == 3  # all configured samples, no more
    assert result["nodes_quantized"] == 5 and result["size_ratio"] < 0.7  # 4 Conv + Gemm
    assert result["preprocess"] == "full" and result["fallbacks"] == []
    int8_accuracy = float((_top1(result["onnx_path"], arrays["pixels"]) == arrays["labels"]).mean())
    assert fp32_accuracy > 0.9 and int8_accuracy > fp32_accuracy - 0.03, (fp32_accuracy, int8_accuracy)


@pytest.fixture(scope="module")
def encoder_work(tmp_path_factory):
    root = tmp_path_factory.mktemp("enc")
    spec_dict = encoder_spec(root / "ckpt")
    (root / "ckpt").mkdir()
    torch.save(TinyEncoder(vocab=50, max_len=32).eval().state_dict(), root / "ckpt" / "model.pt")
    conv.convert(spec_of(spec_dict), root / "ckpt" / "model.pt", root / "work")
    return root, spec_dict


@pytest.mark.parametrize("method", ["entropy", "minmax"])
def test_encoder_mask_consumers_stay_float(encoder_work, method):
    root, spec_dict = encoder_work
    spec = spec_of({**spec_dict, "calibration": {"method": method, "samples": 16, "batch_size": 4}})
    result = cal.calibrate(spec, root / "work")
    assert result["mask_inputs"] == ["attention_mask"] and result["samples"] == 16
    model = onnx.load(result["onnx_path"])
    excluded = set(result["excluded_nodes"])
    # the score + mask-bias Adds are excluded and are not fed by DequantizeLinear
    dq = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    assert excluded and all(not (set(n.input) & dq) for n in model.graph.node if n.name in excluded)
    assert result["nodes_quantized"] > 0


def test_entropy_on_finfo_min_mask_is_a_clear_bad_input(tmp_path, monkeypatch):
    write_module(tmp_path / "user", "hf_style", FINFO_MASK)
    monkeypatch.syspath_prepend(str(tmp_path / "user"))
    spec_dict = encoder_spec(tmp_path / "ckpt", name="hf-style", factory="hf_style:HfStyle", factory_kwargs={},
                             checkpoint={"uri": str(tmp_path / "ckpt"), "filename": "model.safetensors"},
                             calibration={"method": "entropy", "samples": 8, "batch_size": 4, "data": "cal.npz",
                                          "op_types": ["MatMul", "Add"]})
    # real calibration data has padding: the mask bias then spans [finfo.min, 0]
    rng = np.random.default_rng(0)
    mask = np.ones((8, 12), np.int64)
    mask[:, 9:] = 0
    np.savez(tmp_path / "cal.npz", input_ids=rng.integers(0, 50, (8, 12)), attention_mask=mask)
    modelload.save_checkpoint(modelload.instantiate(spec_of(spec_dict)), tmp_path / "ckpt" / "model.safetensors")
    config = write_config(tmp_path / "export.yaml", spec_dict)
    work = tmp_path / "work"
    code, _, err = run_cli("convert", config, "hf-style", work, "--checkpoint",
                           str(tmp_path / "ckpt" / "model.safetensors"), pythonpath=[tmp_path / "user"])
    assert code == ExitCode.OK, err
    code, result, err = run_cli("calibrate", config, "hf-style", work, pythonpath=[tmp_path / "user"])
    assert code == ExitCode.BAD_INPUT, err
    assert "attention_mask -> Add" in result["error"] and "calibration.method: minmax" in result["error"]
    assert not (work / "onnx-int8").exists()
    # the default op types avoid the mask tensors: entropy works
    spec = spec_of({**spec_dict, "calibration": {"method": "entropy", "samples": 8, "batch_size": 4,
                                                 "data": "cal.npz"}})
    assert cal.calibrate(spec, work, tmp_path / "cal.npz")["nodes_quantized"] > 0
    sys.modules.pop("hf_style", None)


def test_preprocess_falls_back(tmp_path, monkeypatch, encoder_work):
    root, _ = encoder_work
    calls = []

    def flaky(src, dst, **kwargs):
        calls.append(kwargs)
        raise RuntimeError("symbolic shape inference exploded")

    monkeypatch.setattr(cal, "quant_pre_process", flaky)
    src = root / "work" / "onnx-fp32" / "model.onnx"
    used, mode, reasons = cal.preprocess(src, tmp_path / "pre.onnx")
    assert (used, mode) == (src, "none") and len(reasons) == 2
    assert calls == [{}, {"skip_symbolic_shape": True}] and "exploded" in reasons[0]


def test_mask_derived_pure():
    h = onnx.helper
    nodes = [
        h.make_node("Cast", ["mask"], ["mask_f"], to=onnx.TensorProto.FLOAT, name="cast"),
        h.make_node("Mul", ["mask_f", "neg"], ["bias"], name="mul"),
        h.make_node("Gather", ["emb", "ids"], ["x"], name="embed"),
        h.make_node("Add", ["x", "bias"], ["y"], name="add"),
    ]
    graph = h.make_graph(
        nodes, "g",
        [h.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["b", 4]),
         h.make_tensor_value_info("mask", onnx.TensorProto.INT64, ["b", 4])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["b", 4, 2])],
        initializer=[h.make_tensor("neg", onnx.TensorProto.FLOAT, [], [-1e4]),
                     h.make_tensor("emb", onnx.TensorProto.FLOAT, [3, 2], [0.0] * 6)],
    )
    model = onnx.shape_inference.infer_shapes(h.make_model(graph))
    masks, consumers = cal.mask_derived(model)
    assert masks == {"mask_f": "mask", "bias": "mask"}  # the embedding output x is an activation
    assert consumers == ["mul", "add"]
    assert cal.calibrated_mask_tensors(model, masks, ["Add"]) == {"bias": "mask -> Add 'add'"}
    assert cal.calibrated_mask_tensors(model, masks, ["MatMul"]) == {}


def test_calibrate_before_convert_and_bad_data(tmp_path):
    spec = spec_of(digits_spec(tmp_path, calibration={"data": "cal.npz"}))
    with pytest.raises(BadInputError, match="run `convert` for this workdir first"):
        cal.calibrate(spec, tmp_path / "work")
    np.savez(tmp_path / "cal.npz", pixels=np.zeros((4, 8, 8), np.float32))
    with pytest.raises(BadInputError, match="input 'pixels' has shape"):
        cal.calibration_batches(spec, tmp_path / "cal.npz")


def test_corrupt_fp32_model_is_bad_input_and_keeps_the_int8_artifact(tmp_path):
    """A truncated onnx-fp32/model.onnx (a copy cut short, a disk filled up): exit 2 naming the file and `convert`,
    not a protobuf DecodeError (exit 1); a previously built onnx-int8 is left as it was."""
    config = write_config(tmp_path / "export.yaml", digits_spec(tmp_path, calibration={"samples": 8}))
    work = tmp_path / "work dir"
    conv.export_torchscript(modelload.instantiate(spec_of(digits_spec(tmp_path))).eval(),
                            spec_of(digits_spec(tmp_path)), {"pixels": np.zeros((2, 1, 8, 8), np.float32)},
                            (tmp_path / "full.onnx"))
    fp32 = work / "onnx-fp32" / "model.onnx"
    fp32.parent.mkdir(parents=True)
    fp32.write_bytes((tmp_path / "full.onnx").read_bytes()[:3000])
    old_int8 = work / "onnx-int8" / "model.onnx"
    old_int8.parent.mkdir()
    old_int8.write_bytes(b"previous int8")
    code, result, stderr = run_cli("calibrate", config, "digits-cnn", work)
    assert code == ExitCode.BAD_INPUT, stderr
    assert "is not a readable ONNX model" in result["error"] and str(fp32) in result["error"]
    assert "Rerun `convert`" in result["error"] and "Traceback" not in stderr
    assert old_int8.read_bytes() == b"previous int8"
    assert not [p for p in work.iterdir() if p.name.startswith(".")]
