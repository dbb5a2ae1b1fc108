"""Object storage for checkpoints, data and exported models: local paths or s3:// URIs.

Contract: `is_remote(uri)` tells s3:// apart from local paths; `upload_dir` / `download_dir`
copy a folder tree with boto3; `check_writable(uri)` fails fast, naming the URI, when a bucket
is missing or unreachable; `ray_storage(uri)` gives the (path, pyarrow filesystem) pair Ray
Train's `RunConfig` takes. boto3 and pyarrow honour `AWS_ENDPOINT_URL` (S3-compatible servers).
"""

from __future__ import annotations

import os
from pathlib import Path


class StorageError(RuntimeError):
    """A storage URI cannot be used."""


def is_remote(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    if not is_remote(uri):
        raise StorageError(f"{uri!r} is not an s3:// URI")
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    if not bucket:
        raise StorageError(f"{uri!r} names no bucket")
    return bucket, prefix.strip("/")


def _client():
    import boto3

    return boto3.client("s3")


def check_writable(uri: str) -> None:
    if not is_remote(uri):
        Path(uri).mkdir(parents=True, exist_ok=True)
        return
    bucket, _ = split_s3(uri)
    try:
        _client().head_bucket(Bucket=bucket)
    except Exception as err:  # noqa: BLE001 - botocore raises many kinds; all mean unusable
        raise StorageError(f"storage {uri} is not reachable: {err}") from None


def upload_dir(local: str | Path, uri: str) -> None:
    bucket, prefix = split_s3(uri)
    client = _client()
    local = Path(local)
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        key = f"{prefix}/{path.relative_to(local).as_posix()}".lstrip("/")
        client.upload_file(str(path), bucket, key)


def download_dir(uri: str, local: str | Path) -> Path:
    bucket, prefix = split_s3(uri)
    client = _client()
    local = Path(local)
    found = False
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/"):
        for item in page.get("Contents", []):
            target = local / item["Key"][len(prefix) + 1:]
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, item["Key"], str(target))
            found = True
    if not found:
        raise StorageError(f"nothing stored under {uri}")
    return local


def ray_storage(uri: str):
    """(storage_path, storage_filesystem) for Ray Train; local paths become absolute."""
    if not is_remote(uri):
        return os.path.abspath(uri), None
    import pyarrow.fs

    bucket, prefix = split_s3(uri)
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    options = {}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        options = {"endpoint_override": host, "scheme": scheme}
    filesystem = pyarrow.fs.S3FileSystem(region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"), **options)
    return f"{bucket}/{prefix}".rstrip("/"), filesystem


def local_copy(uri: str) -> Path:
    """A local folder with the contents of `uri` (downloaded once per URI into the cache)."""
    if not is_remote(uri):
        return Path(uri)
    import hashlib

    cache = Path(os.environ.get("MOERAY_CACHE_DIR", Path.home() / ".cache" / "moeray")) / "downloads"
    target = cache / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if not (target / ".complete").exists():
        download_dir(uri, target)
        (target / ".complete").touch()
    return target
