"""Object storage for checkpoints, data and exported models: local paths or s3:// URIs.

Contract: `is_remote(uri)` tells s3:// apart from local paths; `upload_dir` / `download_dir`
copy a folder tree with boto3; `check_writable(uri)` fails fast, naming the URI, when a bucket
is missing or unreachable; `ray_storage(uri)` gives the (path, pyarrow filesystem) pair Ray
Train's `RunConfig` takes; `RemoteFolder` reads single objects or byte ranges of them (so a
checkpoint reader fetches only the tensors it needs). boto3 and pyarrow honour
`AWS_ENDPOINT_URL` (S3-compatible servers).
"""

from __future__ import annotations

import os
from pathlib import Path


class StorageError(RuntimeError):
    """A storage URI cannot be used."""


def is_remote(uri: str) -> bool:
    return uri.startswith("s3://")


def model_location(value: str | Path) -> str | Path:
    """Where a model's files are read from: a Hugging Face model id becomes its snapshot folder
    in huggingface_hub's cache (fetched if need be); folders and s3:// URIs stay as they are."""
    from moeray.hub import hub_snapshot, is_hub_id

    return hub_snapshot(value) if isinstance(value, str) and is_hub_id(value) else value


def absolute_local(value: str | None) -> str | None:
    """A local path made absolute (jobs run elsewhere than they were submitted from); URIs and
    Hugging Face model ids are kept as they are."""
    from moeray.hub import is_hub_id

    if value is None or "://" in value or is_hub_id(value):
        return value
    return os.path.abspath(value)


def split_s3(uri: str) -> tuple[str, str]:
    if not is_remote(uri):
        raise StorageError(f"{uri!r} is not an s3:// URI")
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    if not bucket:
        raise StorageError(f"{uri!r} names no bucket")
    return bucket, prefix.strip("/")


def _client(quick: bool = False):
    """An S3 client; `quick` gives up within seconds on an endpoint that does not answer (for
    checks run before anything starts, where botocore's default would wait a minute per try)."""
    import boto3

    if not quick:
        return boto3.client("s3")
    from botocore.config import Config

    return boto3.client("s3", config=Config(connect_timeout=2, read_timeout=5,
                                            retries={"max_attempts": 2, "mode": "standard"}))


def check_writable(uri: str) -> None:
    if not is_remote(uri):
        Path(uri).mkdir(parents=True, exist_ok=True)
        return
    bucket, _ = split_s3(uri)
    try:
        _client().head_bucket(Bucket=bucket)
    except Exception as err:  # noqa: BLE001 - botocore raises many kinds; all mean unusable
        raise StorageError(f"storage {uri} is not reachable: {err}") from None


def file_exists(uri: str) -> bool:
    """Whether the file `uri` (a path or an s3:// object) exists; an unreachable store raises StorageError."""
    if not is_remote(uri):
        return Path(uri).is_file()
    from botocore.exceptions import ClientError

    bucket, key = split_s3(uri)
    try:
        _client(quick=True).head_object(Bucket=bucket, Key=key)
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return False
        raise StorageError(f"cannot read {uri}: {err}") from None
    except Exception as err:  # noqa: BLE001 - botocore raises many kinds; all mean unreachable
        raise StorageError(f"storage for {uri} is not reachable: {err}") from None
    return True


def upload_dir(local: str | Path, uri: str) -> None:
    bucket, prefix = split_s3(uri)
    client = _client()
    local = Path(local)
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        key = f"{prefix}/{path.relative_to(local).as_posix()}".lstrip("/")
        client.upload_file(str(path), bucket, key)


def download_dir(uri: str, local: str | Path, skip_suffixes: tuple[str, ...] = ()) -> Path:
    bucket, prefix = split_s3(uri)
    client = _client()
    local = Path(local)
    found = False
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/"):
        for item in page.get("Contents", []):
            if skip_suffixes and item["Key"].endswith(skip_suffixes):
                continue
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


def local_copy(uri: str, skip_suffixes: tuple[str, ...] = (), revision: str = "") -> Path:
    """A local folder with the contents of `uri` (downloaded once per URI into the cache; a
    Hugging Face model id comes from huggingface_hub's own cache, see hub.py).

    `skip_suffixes` leaves matching files out (for example the weights of a model whose tensors
    are read remotely, when only its tokenizer is needed here). A new `revision` downloads
    `uri` again (an adapter stored again under the same URI and loaded again).
    """
    from moeray.hub import hub_snapshot, is_hub_id

    if is_hub_id(uri):
        return hub_snapshot(uri, skip_suffixes)
    if not is_remote(uri):
        return Path(uri)
    import hashlib

    cache = Path(os.environ.get("MOERAY_CACHE_DIR", Path.home() / ".cache" / "moeray")) / "downloads"
    identity = (uri, skip_suffixes, revision) if revision else (uri, skip_suffixes)
    target = cache / hashlib.sha256(repr(identity).encode()).hexdigest()[:16]
    if not (target / ".complete").exists():
        download_dir(uri, target, skip_suffixes)
        (target / ".complete").touch()
    return target


class RemoteFolder:
    """Objects under one s3:// prefix, read whole or by byte range; counts the bytes it fetched."""

    def __init__(self, uri: str, quick: bool = False):
        self.uri = uri.rstrip("/")
        self.bucket, self.prefix = split_s3(self.uri)
        self.client = _client(quick)
        self.bytes_read = 0

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}".lstrip("/")

    def exists(self, name: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(name))
            return True
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise StorageError(f"{self.uri}/{name}: {err}") from None
        except BotoCoreError as err:  # no answer at all: endpoint down, DNS, credentials missing
            raise StorageError(f"{self.uri} is not reachable: {err}") from None

    def names(self) -> list[str]:
        """Object names directly under the prefix (not in sub-folders)."""
        names = []
        for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._key(""), Delimiter="/"):
            names += [item["Key"].rsplit("/", 1)[-1] for item in page.get("Contents", [])]
        return sorted(names)

    def read(self, name: str, start: int | None = None, end: int | None = None) -> bytes:
        """The object's bytes, or bytes [start, end) of it."""
        from botocore.exceptions import BotoCoreError, ClientError

        options = {} if start is None else {"Range": f"bytes={start}-{end - 1}"}
        try:
            data = self.client.get_object(Bucket=self.bucket, Key=self._key(name), **options)["Body"].read()
        except (BotoCoreError, ClientError) as err:
            raise StorageError(f"cannot read {self.uri}/{name}: {err}") from None
        if start is not None and len(data) != end - start:
            raise StorageError(f"{self.uri}/{name}: asked for bytes {start}..{end}, got {len(data)} bytes")
        self.bytes_read += len(data)
        return data
