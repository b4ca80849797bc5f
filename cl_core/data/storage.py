"""Storage locations: a local path, or a URI ``scheme://...`` served by a storage backend.

cl_core reads and writes data through these functions only. It knows local files and no
object store's SDK: a URI with a scheme (``s3://bucket/prefix``) goes to the
:class:`Backend` registered for that scheme. The layers above provide the backends:
``s3`` is :class:`infra.s3.S3Storage` (boto3 and pyarrow, the standard AWS environment),
registered by :func:`register` (``pipelines`` does so on import) or, in any other process
(a spawned DataLoader worker, a script that imports cl_core only), found through the
``clpipe.storage`` entry point group the first time a URI of its scheme is used.

Failures raise :class:`StorageError` with one line naming the location and the fix.

Importing this module makes ``webdataset.gopen`` stream every scheme with a backend
(registered or advertised by an entry point) through :func:`open_read` (forked DataLoader
workers inherit it), so ``wds.gopen("s3://...")`` reads through the backend.
"""

from __future__ import annotations

import os
import re
import sys
from importlib import metadata
from pathlib import Path
from typing import IO, Any, Protocol

import webdataset  # noqa: F401 - loads webdataset.gopen

ENTRY_POINTS = "clpipe.storage"  # entry point group: scheme name -> a Backend class or factory
_SCHEME = re.compile(r"^([a-z][a-z0-9+.-]*)://")


class StorageError(OSError):
    """A storage location that cannot be used; the message says which and why."""


class Backend(Protocol):
    """What a storage backend does for the URIs of its scheme. Every argument named
    ``uri`` is a full URI of that scheme; an error raises :class:`StorageError` (or an
    ``OSError``) whose message starts with the URI."""

    def exists(self, uri: str) -> bool:
        """Whether the object exists (a missing container is an error, not False)."""
        ...

    def exists_any(self, uri: str) -> bool:
        """Whether ``uri`` is an object or a prefix holding at least one."""
        ...

    def list_files(self, uri: str) -> list[str]:
        """Every object under the prefix ``uri`` (recursive), as URIs, sorted."""
        ...

    def sizes(self, uri: str) -> dict[str, int]:
        """Name -> size in bytes of every object directly under the prefix ``uri``."""
        ...

    def read_bytes(self, uri: str) -> bytes: ...

    def read_object(self, uri: str) -> bytes:
        """One whole object, the backend's fastest way for many small ones."""
        ...

    def open_read(self, uri: str) -> IO[bytes]:
        """A binary read stream that does not hold the object whole."""
        ...

    def write_bytes(self, uri: str, data: bytes) -> None: ...

    def upload_file(self, path: str | os.PathLike, uri: str) -> None: ...

    def download_file(self, uri: str, path: str | os.PathLike) -> None: ...

    def delete_prefix(self, uri: str) -> int:
        """Delete every object under ``uri``; returns how many."""
        ...

    def check(self, uri: str) -> None:
        """Raise :class:`StorageError` unless the location can be used (its container
        exists and the credentials may use it)."""
        ...


_backends: dict[str, Backend] = {}


def register(scheme: str, backend: Backend) -> None:
    """Serve ``scheme://`` URIs through ``backend`` in this process (and in processes it forks)."""
    _backends[scheme] = backend
    _route_gopen(scheme)


def scheme(uri: str | os.PathLike) -> str | None:
    """``"s3"`` for ``s3://bucket/key``; None for a local path."""
    m = _SCHEME.match(str(uri))
    return m.group(1) if m else None


def is_remote(uri: str | os.PathLike) -> bool:
    """Whether ``uri`` names a location of a storage backend rather than a local path."""
    return scheme(uri) is not None


def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith("s3://")


def _advertised() -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINTS)}


def backend(uri: str | os.PathLike) -> Backend:
    """The backend for ``uri``'s scheme: registered, else loaded from its entry point."""
    name = scheme(uri)
    if name is None:
        raise ValueError(f"{uri}: a local path has no storage backend")
    if name not in _backends:
        ep = _advertised().get(name)
        if ep is None:
            raise StorageError(
                f"{uri}: no storage backend for {name}:// in this process; install clpipe (pip install -e .) "
                f"or call cl_core.data.storage.register({name!r}, backend)"
            )
        factory: Any = ep.load()
        register(name, factory())
    return _backends[name]


def join(base: str | os.PathLike, *parts: str) -> str:
    """``base`` / ``parts`` for a local path or a URI."""
    if is_remote(base):
        out = str(base).rstrip("/")
        for p in parts:
            out += "/" + p.strip("/")
        return out
    return str(Path(base).joinpath(*parts))


# -- the operations: local files here, a URI through its backend ------------------------


def exists(uri: str | os.PathLike) -> bool:
    if not is_remote(uri):
        return Path(uri).exists()
    return backend(uri).exists(str(uri))


def exists_any(uri: str | os.PathLike) -> bool:
    """Whether ``uri`` is a file/object or a directory/prefix holding at least one."""
    if not is_remote(uri):
        return Path(uri).exists()
    return backend(uri).exists_any(str(uri))


def list_files(uri: str | os.PathLike) -> list[str]:
    """Every file/object under ``uri`` (recursive), as paths/URIs, sorted."""
    if not is_remote(uri):
        return sorted(str(p) for p in Path(uri).rglob("*") if p.is_file())
    return backend(uri).list_files(str(uri))


def sizes(uri: str | os.PathLike) -> dict[str, int]:
    """Name -> size in bytes of every file directly in ``uri`` (one listing); empty when
    the directory does not exist."""
    if not is_remote(uri):
        try:
            with os.scandir(str(uri)) as entries:
                return {e.name: e.stat().st_size for e in entries if e.is_file()}
        except FileNotFoundError:
            return {}
    return backend(uri).sizes(str(uri))


def read_bytes(uri: str | os.PathLike) -> bytes:
    if not is_remote(uri):
        return Path(uri).read_bytes()
    return backend(uri).read_bytes(str(uri))


def read_object(uri: str | os.PathLike) -> bytes:
    """One whole file/object; for many small objects, the backend's fastest read."""
    if not is_remote(uri):
        return Path(uri).read_bytes()
    return backend(uri).read_object(str(uri))


def open_read(uri: str | os.PathLike) -> IO[bytes]:
    """A binary read stream for a local file or an object."""
    if not is_remote(uri):
        return open(uri, "rb")
    return backend(uri).open_read(str(uri))


def write_bytes(uri: str | os.PathLike, data: bytes) -> None:
    """Write one object/file whole (a local file via a temporary name and a rename)."""
    if not is_remote(uri):
        p = Path(uri)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, p)
        return
    backend(uri).write_bytes(str(uri), data)


def upload_file(path: str | os.PathLike, uri: str) -> None:
    backend(uri).upload_file(path, uri)


def download_file(uri: str, path: str | os.PathLike) -> None:
    backend(uri).download_file(uri, path)


def download_dir(uri: str, local: str | os.PathLike) -> Path:
    """Copy every object under ``uri`` into ``local`` (relative layout kept)."""
    local = Path(local)
    base = uri.rstrip("/") + "/"
    for obj in list_files(uri):
        download_file(obj, local / obj[len(base) :])
    return local


def delete_prefix(uri: str) -> int:
    """Delete every object under ``uri`` (a URI prefix); returns how many."""
    return backend(uri).delete_prefix(uri)


def check(uri: str | os.PathLike) -> None:
    """Raise :class:`StorageError` unless the remote location ``uri`` can be used; a
    local path passes."""
    if is_remote(uri):
        backend(uri).check(str(uri))


# -- webdataset ------------------------------------------------------------------------


def _gopen(url: str, mode: str = "rb", bufsize: int = 8192, **_: Any) -> IO[bytes]:
    if mode[0] != "r":
        raise ValueError(f"{url}: remote shards are read-only here (mode {mode!r})")
    return open_read(url)


def _route_gopen(name: str) -> None:
    sys.modules["webdataset.gopen"].gopen_schemes[name] = _gopen  # the module, not the function


for _name in _advertised():
    _route_gopen(_name)
