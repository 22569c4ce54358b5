"""`python -m export_lib calibrate`: onnx-fp32 -> onnx-int8 QDQ (and tensorrt-int8 when configured)."""

from __future__ import annotations

import argparse
from pathlib import Path

from export_lib import workdir
from export_lib.commands._common import add_model_arguments, load_model

HELP = ("INT8 static calibration (QDQ) of the converted fp32 ONNX model with onnxruntime.quantization over the "
        "configured calibration samples; builds the TensorRT INT8 engine from it when configured.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--data", type=Path, default=None,
                        help="calibration .npz (default: from calibration.data; s3:// entries are read from "
                             "<workdir>/data/)")


def run(args: argparse.Namespace) -> dict:
    from export_lib.calibrate import calibrate

    _, spec = load_model(args)
    data = args.data
    if data is None and spec.calibration.data != "generated":
        data = workdir.data_path(args.workdir, spec.calibration.data, Path(args.config).resolve().parent)
    return calibrate(spec, args.workdir, data)
