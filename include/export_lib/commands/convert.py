"""`python -m export_lib convert`: checkpoint -> onnx-fp32 (and tensorrt-fp16 when configured)."""

from __future__ import annotations

import argparse
from pathlib import Path

from export_lib import workdir
from export_lib.commands._common import add_model_arguments, load_model

HELP = ("Load the checkpoint into the model from its factory, export ONNX fp32 with dynamic axes (dynamo, TorchScript "
        "fallback), check it, and build the TensorRT FP16 engine when configured.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="checkpoint file (default: <workdir>/checkpoint/<checkpoint.filename>)")


def run(args: argparse.Namespace) -> dict:
    from export_lib.convert import convert

    _, spec = load_model(args)
    checkpoint = args.checkpoint or workdir.checkpoint_path(args.workdir, spec)
    return convert(spec, checkpoint, args.workdir)
