"""The ``s3://`` storage backend: boto3 and pyarrow with the standard AWS environment.

Credentials come from the standard AWS chain (the environment: ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``; the shared credentials file; an instance
or pod role), refreshed as the SDKs do; the endpoint from ``AWS_ENDPOINT_URL`` or
``AWS_ENDPOINT_URL_S3`` and ``AWS_DEFAULT_REGION``, so AWS S3, MinIO and SeaweedFS work
unchanged. No key is ever passed explicitly. Every call has bounded time: botocore's
connect/read timeouts and a bounded number of retries with backoff. Reads stream: a shard
is read from the GET body as the tar parser asks for bytes, never copied whole to disk,
and a connection that breaks mid-object is resumed with a ranged GET from the byte it
stopped at (a bounded number of times).

Failures raise :class:`cl_core.data.storage.StorageError` with one line naming the URL and
the fix: unreachable endpoint, missing bucket, missing object, refused credentials.

:class:`S3Storage` is what :mod:`cl_core.data.storage` calls for an ``s3://`` URI (cl_core
itself knows no object store): it is registered by :func:`install` (``pipelines`` does
so on import) and found through the ``clpipe.storage`` entry point in any other process.
"""

from __future__ import annotations

import io
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from cl_core.data import storage
from cl_core.data.storage import StorageError, is_s3

RETRIES = int(os.environ.get("CLPIPE_S3_RETRIES", "4"))  # re-reads of a broken stream; botocore retries calls
BACKOFF_S = 0.5
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 60.0

_local = threading.local()
logging.getLogger("botocore.credentials").setLevel(logging.WARNING)  # "Found credentials in ..." per process


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key)."""
    if not is_s3(uri):
        raise ValueError(f"{uri}: not an s3:// URI")
    bucket, _, key = uri[5:].partition("/")
    if not bucket:
        raise StorageError(f"{uri}: no bucket in the URI; write s3://BUCKET/prefix")
    return bucket, key


def endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def _env_key() -> tuple:
    """What a cached S3 client depends on: the endpoint, the credentials (secrets hashed),
    the region and the process."""
    return (
        endpoint(),
        os.environ.get("AWS_ACCESS_KEY_ID"),
        hash(os.environ.get("AWS_SECRET_ACCESS_KEY")),
        hash(os.environ.get("AWS_SESSION_TOKEN")),
        os.environ.get("AWS_DEFAULT_REGION"),
        os.getpid(),
    )


def client() -> Any:
    """A boto3 S3 client for this thread and environment (cached), with bounded
    timeouts and retries."""
    key = _env_key()
    cached = getattr(_local, "clients", None)
    if cached is None:
        cached = _local.clients = {}
    if key not in cached:
        import boto3
        from botocore.config import Config

        cfg = Config(
            connect_timeout=CONNECT_TIMEOUT_S,
            read_timeout=READ_TIMEOUT_S,
            retries={"max_attempts": 3, "mode": "standard"},
        )
        cached[key] = boto3.session.Session().client("s3", endpoint_url=endpoint(), config=cfg)
    return cached[key]


def explain(uri: str, e: Exception) -> StorageError:
    """One line for a boto3/botocore failure on ``uri``."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    where = endpoint() or "AWS S3"
    if isinstance(e, EndpointConnectionError) or type(e).__name__ in ("ConnectTimeoutError", "ConnectionClosedError"):
        return StorageError(
            f"{uri}: cannot reach the S3 endpoint {where}; check AWS_ENDPOINT_URL and that the server is running"
        )
    if isinstance(e, NoCredentialsError):
        return StorageError(f"{uri}: no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    if isinstance(e, ClientError):
        code = str(e.response.get("Error", {}).get("Code", ""))
        bucket = split_s3(uri)[0] if is_s3(uri) else "?"
        if code == "NoSuchBucket":
            return StorageError(f"{uri}: bucket {bucket!r} does not exist at {where}; create it or fix the URI")
        if code in ("NoSuchKey", "404", "NotFound"):
            return StorageError(f"{uri}: no such object at {where}")
        if code in (
            "SignatureDoesNotMatch",
            "InvalidAccessKeyId",
            "AccessDenied",
            "403",
            "InvalidToken",
            "ExpiredToken",
        ):
            return StorageError(
                f"{uri}: {where} refused the credentials ({code}); check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            )
        return StorageError(f"{uri}: S3 error {code} at {where}: {e.response.get('Error', {}).get('Message', '')}")
    return StorageError(f"{uri}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


def _call(uri: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except StorageError:
        raise
    except Exception as e:
        if type(e).__module__.startswith(("botocore", "boto3", "urllib3")):
            raise explain(uri, e) from None
        raise


# -- whole objects and files ---------------------------------------------------------


def pyarrow_fs(uri: str) -> tuple[Any, str]:
    """(pyarrow S3FileSystem for the AWS environment, the path inside it) for an
    ``s3://`` URI: what Ray Train/Tune take as ``storage_filesystem`` and ``storage_path``."""
    bucket, key = split_s3(uri)
    return _new_arrow_fs(), f"{bucket}/{key}".rstrip("/")


def _new_arrow_fs() -> Any:
    from pyarrow import fs

    ep = endpoint()
    kwargs: dict[str, Any] = {
        "region": os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1",
        "connect_timeout": CONNECT_TIMEOUT_S,
        "request_timeout": READ_TIMEOUT_S,
    }
    if ep:
        scheme, _, rest = ep.partition("://")
        kwargs.update(endpoint_override=rest or ep, scheme=scheme if rest else "https")
    # no keys passed: pyarrow's default AWS credential chain (the environment, session token included,
    # the shared credentials file, an instance or pod role) finds and refreshes them; keys passed here
    # would be pickled with the filesystem (Ray Tune stores its run config, filesystem included, in the
    # bucket) and would never refresh
    return fs.S3FileSystem(**kwargs)


def check_bucket(uri: str) -> None:
    """Raise unless ``uri``'s bucket exists and the credentials may use it."""
    from botocore.exceptions import ClientError

    bucket, _ = split_s3(uri)
    try:
        client().head_bucket(Bucket=bucket)
    except ClientError as e:
        if str(e.response.get("Error", {}).get("Code")) in ("404", "NoSuchBucket", "NotFound"):
            raise StorageError(
                f"{uri}: bucket {bucket!r} does not exist at {endpoint() or 'AWS S3'}; create it or fix the URI"
            ) from None
        raise explain(uri, e) from None
    except Exception as e:
        raise explain(uri, e) from None


def _arrow_fs() -> Any:
    """pyarrow's S3 filesystem for this process and AWS environment (cached)."""
    key = _env_key()
    if _arrow.get("key") != key:
        _arrow.update(key=key, fs=_new_arrow_fs())
    return _arrow["fs"]


_arrow: dict[str, Any] = {}


def read_object(uri: str) -> bytes:
    """One whole ``s3://`` object through pyarrow's S3 client (the AWS C++ SDK), for
    many small objects: it spends about half of boto3's CPU time per GET, and it releases
    the GIL while it waits, so reads on several threads overlap (boto3's serialise on
    the GIL: more threads made it slower). A failure raises an OSError (after the SDK's
    own retries) whose one line names ``uri``."""
    bucket, key = split_s3(uri)
    try:
        with _arrow_fs().open_input_stream(f"{bucket}/{key}") as f:
            return f.read()
    except OSError as e:
        cause = (str(e).splitlines() or [""])[0][:300]
        raise type(e)(f"{uri}: {cause}") from None


# -- the operations ------------------------------------------------------------------


def exists(uri: str) -> bool:
    from botocore.exceptions import ClientError

    bucket, key = split_s3(uri)
    try:
        client().head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as e:
        if str(e.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
            check_bucket(uri)  # a missing bucket is an error, not a missing object
            return False
        raise explain(uri, e) from None
    except Exception as e:
        raise explain(uri, e) from None


def exists_any(uri: str) -> bool:
    """Whether ``uri`` is an object or a prefix holding at least one."""
    if exists(uri):
        return True
    bucket, prefix = split_s3(uri)
    resp = _call(uri, lambda: client().list_objects_v2(Bucket=bucket, Prefix=prefix.rstrip("/") + "/", MaxKeys=1))
    return bool(resp.get("KeyCount", 0))


def list_files(uri: str) -> list[str]:
    """Every object under ``uri`` (recursive), as URIs, sorted."""
    bucket, prefix = split_s3(uri)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    out: list[str] = []

    def page() -> None:
        for resp in client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            # keys ending in "/" are directory markers (pyarrow's create_dir writes them), not files
            out.extend(f"s3://{bucket}/{o['Key']}" for o in resp.get("Contents", []) if not o["Key"].endswith("/"))

    _call(uri, page)
    return sorted(out)


def sizes(uri: str) -> dict[str, int]:
    """Name -> size in bytes of every object directly under the prefix ``uri`` (one listing)."""
    bucket, prefix = split_s3(uri)
    prefix = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
    out: dict[str, int] = {}

    def page() -> None:
        for resp in client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
            out.update({o["Key"][len(prefix) :]: int(o["Size"]) for o in resp.get("Contents", [])})

    _call(uri, page)
    return out


def delete_prefix(uri: str) -> int:
    """Delete every object under ``uri``; returns how many."""
    bucket, _ = split_s3(uri)
    keys = [split_s3(o)[1] for o in list_files(uri)]
    for i in range(0, len(keys), 1000):
        batch = {"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True}
        _call(uri, lambda b=batch: client().delete_objects(Bucket=bucket, Delete=b))  # type: ignore[misc]
    return len(keys)


def write_bytes(uri: str, data: bytes) -> None:
    bucket, key = split_s3(uri)
    _call(uri, lambda: client().put_object(Bucket=bucket, Key=key, Body=data))


def upload_file(path: str | os.PathLike, uri: str) -> None:
    bucket, key = split_s3(uri)
    _call(uri, lambda: client().upload_file(str(path), bucket, key))


def download_file(uri: str, path: str | os.PathLike) -> None:
    bucket, key = split_s3(uri)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    _call(uri, lambda: client().download_file(bucket, key, str(path)))


def open_read(uri: str) -> IO[bytes]:
    """A buffered read stream over one object (:class:`S3Reader`)."""
    return io.BufferedReader(S3Reader(uri), buffer_size=1 << 20)


def read_bytes(uri: str) -> bytes:
    with open_read(uri) as f:
        return f.read()


# -- streaming reads -------------------------------------------------------------


class S3Reader(io.RawIOBase):
    """A forward-only read stream over one S3 object that survives broken connections:
    after a transient error it reissues the GET from the current byte (``Range``), at
    most ``RETRIES`` times per stream with exponential backoff, then raises."""

    def __init__(self, uri: str, retries: int = RETRIES) -> None:
        self.uri, self.retries = uri, retries
        self.bucket, self.key = split_s3(uri)
        self.pos, self.failures = 0, 0
        self.size: int | None = None
        self._body: Any = None
        self._open()

    def _open(self) -> None:
        kwargs = {"Bucket": self.bucket, "Key": self.key}
        if self.pos:
            kwargs["Range"] = f"bytes={self.pos}-"
        resp = _call(self.uri, lambda: client().get_object(**kwargs))
        if self.size is None:
            self.size = int(resp["ContentLength"])
        self._body = resp["Body"]

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        if self.size is not None and self.pos >= self.size:
            return 0
        view = memoryview(buf).cast("B")
        while True:
            try:
                chunk = self._body.read(len(view))
                break
            except Exception as e:  # a connection reset or read timeout mid-object
                if not type(e).__module__.startswith(
                    ("botocore", "urllib3", "http", "socket", "ssl")
                ) and not isinstance(e, (ConnectionError, TimeoutError)):
                    raise
                self.failures += 1
                if self.failures > self.retries:
                    raise StorageError(
                        f"{self.uri}: the read failed {self.failures} times at byte {self.pos} "
                        f"(last: {type(e).__name__}); check the S3 endpoint {endpoint()}"
                    ) from None
                time.sleep(BACKOFF_S * 2 ** (self.failures - 1))
                self._close_body()
                self._open()
        n = len(chunk)
        view[:n] = chunk
        self.pos += n
        return n

    def _close_body(self) -> None:
        if self._body is not None:
            try:
                self._body.close()
            except Exception:
                pass
            self._body = None

    def close(self) -> None:
        self._close_body()
        super().close()


# -- the backend ---------------------------------------------------------------------


class S3Storage:
    """:class:`cl_core.data.storage.Backend` for ``s3://`` URIs (the functions above)."""

    exists = staticmethod(exists)
    exists_any = staticmethod(exists_any)
    list_files = staticmethod(list_files)
    sizes = staticmethod(sizes)
    read_bytes = staticmethod(read_bytes)
    read_object = staticmethod(read_object)
    open_read = staticmethod(open_read)
    write_bytes = staticmethod(write_bytes)
    upload_file = staticmethod(upload_file)
    download_file = staticmethod(download_file)
    delete_prefix = staticmethod(delete_prefix)
    check = staticmethod(check_bucket)


def install() -> None:
    """Serve ``s3://`` through :class:`S3Storage` in this process."""
    storage.register("s3", S3Storage())
