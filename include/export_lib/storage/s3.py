"""S3 URIs, the client pods use, and error translation."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from export_lib.results import BadInputError, ExportError

log = logging.getLogger(__name__)

DEFAULT_MAX_ATTEMPTS = 10
# Codes S3 (and S3-compatible stores) use for "this conditional write lost": key exists / ETag moved.
PRECONDITION_CODES = frozenset({"PreconditionFailed", "ConditionalRequestConflict", "412", "409"})
# Codes a store answers with when it does not implement conditional writes.
UNSUPPORTED_CONDITIONAL_CODES = frozenset({"NotImplemented", "InvalidArgument", "501"})
NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound"})
_ACCESS_CODES = frozenset({"403", "AccessDenied", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                           "ExpiredToken", "InvalidToken", "AllAccessDisabled"})


@dataclass(frozen=True)
class S3Uri:
    bucket: str
    key: str  # may be "" (the bucket root) or end with "/" (a prefix)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def parse_s3_uri(uri: str) -> S3Uri:
    if not uri.startswith("s3://"):
        raise BadInputError(f"'{uri}' is not an S3 URI: write it as s3://bucket/key")
    bucket, _, key = uri[5:].partition("/")
    if len(bucket) < 3:
        raise BadInputError(f"'{uri}' has no valid bucket name: write it as s3://bucket/key")
    return S3Uri(bucket, key)


def join_key(*parts: str) -> str:
    """Join key parts with single slashes (empty parts dropped), e.g. join_key("exports/", "m", "v") -> exports/m/v."""
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def make_client(endpoint_url: str | None = None, max_attempts: int = DEFAULT_MAX_ATTEMPTS,
                retry_mode: str = "standard", max_pool_connections: int = 32) -> Any:
    """The boto3 S3 client pods and local processes use.

    Credentials come from boto3's default chain (environment, IRSA web identity, instance profile);
    `AWS_ENDPOINT_URL` (e.g. MinIO, moto) is honoured. Standard/adaptive retries back off on throttling
    (503 SlowDown) and 5xx, so callers never retry by hand.
    """
    import boto3
    from botocore.config import Config

    config = Config(retries={"mode": retry_mode, "max_attempts": max_attempts},
                    max_pool_connections=max_pool_connections)
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    return boto3.client("s3", endpoint_url=endpoint, config=config)


# ----------------------------------------------------------------------------------------------- errors
def error_code(exc: BaseException) -> str:
    """The S3 error code of a botocore ClientError ('' for anything else)."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return ""
    code = str(response.get("Error", {}).get("Code", ""))
    return code or str(response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))


def is_not_found(exc: BaseException) -> bool:
    return error_code(exc) in NOT_FOUND_CODES


def is_precondition_failed(exc: BaseException) -> bool:
    return error_code(exc) in PRECONDITION_CODES


def is_conditional_unsupported(exc: BaseException) -> bool:
    return error_code(exc) in UNSUPPORTED_CONDITIONAL_CODES


class StorageAccessError(BadInputError):
    """Permission or bucket problem: retrying will not help, a person has to fix credentials or config."""


def storage_error(exc: BaseException, action: str, bucket: str, key: str = "") -> ExportError:
    """A clear, non-retryable error naming the object and the likely fix (botocore already retried)."""
    code = error_code(exc) or type(exc).__name__
    where = f"s3://{bucket}/{key}"
    details = {"bucket": bucket, "key": key, "code": code, "action": action}
    if code in _ACCESS_CODES:
        return StorageAccessError(
            f"{action} {where} was denied ({code}): the credentials in use (IRSA role, S3 secret or the Airflow "
            f"connection) need s3:GetObject/s3:PutObject/s3:ListBucket on bucket '{bucket}', and the bucket policy "
            "must allow them", details=details)
    if code in ("NoSuchBucket",):
        return StorageAccessError(
            f"{action} {where} failed: bucket '{bucket}' does not exist; create it or fix the bucket name in the "
            "export config", details=details)
    if code in NOT_FOUND_CODES:
        return BadInputError(f"{action} {where} failed: the object does not exist", details=details)
    return ExportError(f"{action} {where} failed after retries ({code}): {exc}", details=details)


# ---------------------------------------------------------------------------------------------- listing
@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str
    last_modified: datetime


def iter_objects(client: Any, bucket: str, prefix: str) -> Iterator[ObjectInfo]:
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for o in page.get("Contents", []):
                yield ObjectInfo(o["Key"], int(o["Size"]), o["ETag"].strip('"'), o["LastModified"])
    except Exception as e:
        if error_code(e):
            raise storage_error(e, "listing", bucket, prefix) from e
        raise


def list_prefixes(client: Any, bucket: str, prefix: str) -> list[str]:
    """Immediate sub-'folders' of `prefix` (which should end with '/'), as full prefixes ending with '/'."""
    out: list[str] = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
            out.extend(p["Prefix"] for p in page.get("CommonPrefixes", []))
    except Exception as e:
        if error_code(e):
            raise storage_error(e, "listing", bucket, prefix) from e
        raise
    return out


def _read_or_none(call: Any, bucket: str, key: str) -> Any:
    """`call(Bucket, Key)`, or None when the object does not exist; other S3 errors name the key."""
    try:
        return call(Bucket=bucket, Key=key)
    except Exception as e:
        if is_not_found(e):
            return None
        if error_code(e):
            raise storage_error(e, "reading", bucket, key) from e
        raise


def head(client: Any, bucket: str, key: str) -> dict | None:
    """head_object, or None when the object does not exist."""
    return _read_or_none(client.head_object, bucket, key)


def get_bytes(client: Any, bucket: str, key: str) -> tuple[bytes, str] | None:
    """(body, etag) of an object, or None when it does not exist."""
    r = _read_or_none(client.get_object, bucket, key)
    return None if r is None else (r["Body"].read(), r["ETag"].strip('"'))
