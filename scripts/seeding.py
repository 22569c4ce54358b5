"""Training-side fixtures for the demo and the end-to-end tests: real checkpoints and data in S3.

What a training job would leave behind: `s3://<bucket>/<model>/<step>/model.safetensors` + `_COMPLETE`, and the
evaluation / calibration sets as .npz. Needs torch (the engine's environment), never imported by DAGs.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def digits_files(epochs: int = 6, seed: int = 0, calib_samples: int = 128) -> dict[str, Any]:
    """Train DigitsCNN on sklearn's digits: checkpoint bytes, held-out accuracy, eval and calibration .npz bytes."""
    import torch
    from safetensors.torch import save

    from model_zoo.digits import load_split, train_digits

    torch.set_num_threads(1)  # one thread: the same seed gives the same weights on any machine
    model, accuracy, eval_arrays = train_digits(epochs=epochs, seed=seed)
    x_train, _, _, _ = load_split(seed)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    return {
        "checkpoint": save(state),
        "accuracy": accuracy,
        "eval": _npz_bytes(pixels=eval_arrays["pixels"], labels=eval_arrays["labels"]),
        "calib": _npz_bytes(pixels=x_train[:calib_samples]),
    }


def encoder_checkpoint(seed: int = 0, **kwargs: Any) -> bytes:
    """A seeded, untrained TinyEncoder (export parity does not need a trained transformer)."""
    import torch
    from safetensors.torch import save

    from model_zoo.encoder import TinyEncoder

    torch.manual_seed(seed)
    model = TinyEncoder(**kwargs).eval()
    return save({k: v.detach().contiguous() for k, v in model.state_dict().items()})


def split_uri(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


def ensure_bucket(client, bucket: str) -> None:
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    if bucket not in existing:
        client.create_bucket(Bucket=bucket)


def put_uri(client, uri: str, body: bytes) -> None:
    bucket, key = split_uri(uri)
    ensure_bucket(client, bucket)
    client.put_object(Bucket=bucket, Key=key, Body=body)


def put_checkpoint(client, prefix_uri: str, step: int, files: dict[str, bytes], marker: str = "_COMPLETE") -> str:
    """Upload a checkpoint folder `<prefix>/<step>/` as training does: the files first, the marker last."""
    folder = f"{prefix_uri.rstrip('/')}/{step:06d}/"
    for name, body in files.items():
        put_uri(client, folder + name, body)
    put_uri(client, folder + marker, b"")
    return folder


def mirror_down(client, bucket: str, root: Path) -> int:
    """Copy every object of `bucket` to `root/<bucket>/<key>`; returns the number of files."""
    count = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            path = root / bucket / obj["Key"]
            path.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, obj["Key"], str(path))
            count += 1
    return count


def mirror_up(client, root: Path) -> int:
    """Upload every file under `root/<bucket>/...` (the reverse of `mirror_down`); returns the number of files."""
    count = 0
    if not root.is_dir():
        return 0
    for bucket_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        ensure_bucket(client, bucket_dir.name)
        for path in sorted(p for p in bucket_dir.rglob("*") if p.is_file()):
            client.upload_file(str(path), bucket_dir.name, path.relative_to(bucket_dir).as_posix())
            count += 1
    return count
