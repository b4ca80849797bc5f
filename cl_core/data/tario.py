"""A fast reader of the tar shards: samples straight from the 512-byte tar headers.

Python's ``tarfile`` (what ``webdataset.tarfile_to_samples`` uses) spends ~80 us per
member building ``TarInfo`` objects; a shard sample has three members (``.png``,
``.cls``, ``.json``), so for small images reading the tar cost more than decoding the
PNG. This reader parses the POSIX ustar/GNU/pax headers itself from a buffered stream,
verifies every header checksum, and yields the same dicts as WebDataset's grouping
(``{"__key__", "__url__", ext: bytes, ...}``), so it is a drop-in stage of a
``webdataset.DataPipeline``. The shards stay plain tar files that ``tar`` and
``webdataset.WebDataset`` read.

Given the manifest's checksums (``verify``), :func:`tar_samples` also hashes every byte
of a shard as it streams it (in 1 MiB blocks, so the hash costs little next to the
parsing) and refuses a shard whose content differs from what the shard stage wrote.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import IO, Any

import webdataset as wds

from cl_core.data import storage  # noqa: F401 - routes remote schemes (s3://) of wds.gopen to storage

BLOCK = 512
_ZERO_BLOCK = b"\0" * BLOCK
_REGULAR = (b"0", b"\0", b"7")  # regular file, old-style regular file, contiguous file
_SKIPPED = (b"1", b"2", b"3", b"4", b"5", b"6", b"g")  # links, devices, dirs, FIFOs, global pax
HASH_CHUNK = 1 << 20
RERUN_HINT = "rerun the shard stage (clpipe run --rerun shard)"


class TarFormatError(ValueError):
    """A shard is not a readable tar file (bad header checksum, truncated member)."""


class TarTruncatedError(TarFormatError):
    """A shard ends inside a tar header or member: the file was cut short."""


class ShardChecksumError(ValueError):
    """A shard's bytes differ from the manifest's record (sha256 or size): it was changed
    after the shard stage wrote it. Never skipped by a ``tar_samples`` handler."""


class _Hashing(io.RawIOBase):
    """A raw stream over ``source`` that feeds every byte read to a sha256. Wrapped in a
    large ``io.BufferedReader`` the hash takes the file in 1 MiB blocks while the tar
    parser's small reads stay in C."""

    def __init__(self, source: IO[bytes]) -> None:
        self.source = source
        self.hash = hashlib.sha256()
        self._readinto = getattr(source, "readinto", None)

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        view = memoryview(buf).cast("B")
        if self._readinto is not None:
            n = self._readinto(view) or 0
        else:
            data = self.source.read(len(view))
            n = len(data)
            view[:n] = data
        self.hash.update(view[:n])
        return n


def _hashing_stream(source: IO[bytes]) -> tuple[IO[bytes], Callable[[], str]]:
    """(a read stream over ``source``, a function giving the sha256 of the whole of
    ``source``: it reads whatever the stream has not, e.g. tar's end-of-archive padding)."""
    raw = _Hashing(source)
    stream = io.BufferedReader(raw, HASH_CHUNK)

    def hexdigest() -> str:
        while stream.read(HASH_CHUNK):
            pass
        return raw.hash.hexdigest()

    return stream, hexdigest


def _octal(field: bytes) -> int:
    field = field.rstrip(b"\0 ").lstrip(b" ")
    if field and field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field, "big") & ~(0x80 << (8 * (len(field) - 1)))
    return int(field, 8) if field else 0


def _checksum_ok(header: bytes) -> bool:
    stored = _octal(header[148:156])
    unsigned = sum(header[:148]) + 8 * 32 + sum(header[156:])  # the field itself counts as spaces
    return stored == unsigned


def _pax_path(data: bytes) -> str | None:
    """The ``path`` record of a pax extended header, if any ("<len> path=<value>\\n" records)."""
    pos = 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        if key == b"path":
            return value.decode("utf-8")
        pos += length
    return None


def iter_tar_files(stream: IO[bytes], where: str = "") -> Iterator[tuple[str, bytes]]:
    """(name, content) of every regular file in a tar stream, in order.

    Raises:
        TarFormatError: a header with a wrong checksum, naming ``where`` (the shard's
            URL) and the byte offset; :class:`TarTruncatedError` for a member cut short.
    """
    read = stream.read
    offset = 0
    long_name: str | None = None
    while True:
        header = read(BLOCK)
        if not header or header == _ZERO_BLOCK:
            return  # end of archive (two zero blocks, or a bare end of stream)
        if len(header) < BLOCK:
            if not header.strip(b"\0"):
                return  # a cut-off end-of-archive block: every member before it is whole
            raise TarTruncatedError(f"{where}: truncated tar header at byte {offset} (shard cut short)")
        if not _checksum_ok(header):
            raise TarFormatError(f"{where}: bad tar header checksum at byte {offset}; the shard is corrupt")
        size = _octal(header[124:136])
        kind = header[156:157]
        padded = (size + BLOCK - 1) // BLOCK * BLOCK
        data = read(padded)
        if len(data) < padded:
            raise TarTruncatedError(f"{where}: truncated tar member at byte {offset} (shard cut short)")
        offset += BLOCK + padded
        if kind in (b"L", b"x"):  # GNU long name / pax extended header for the next member
            long_name = data[:size].rstrip(b"\0").decode("utf-8") if kind == b"L" else _pax_path(data[:size])
            continue
        if kind in _REGULAR:
            if long_name is not None:
                name = long_name
            else:
                name = header[:100].split(b"\0", 1)[0].decode("utf-8")
                if header[257:262] == b"ustar":
                    prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8")
                    if prefix:
                        name = f"{prefix}/{name}"
            yield name, data[:size]
        elif kind not in _SKIPPED:
            raise TarFormatError(f"{where}: unsupported tar member type {kind!r} at byte {offset}")
        long_name = None


def _split_key(name: str) -> tuple[str, str] | None:
    """WebDataset's rule: the key is the path up to the first dot of the file name."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot <= slash + 1:
        return None
    return name[:dot], name[dot + 1 :].lower()


def tar_samples(
    urls: Iterable[dict[str, Any]],
    handler: Callable[[Exception], bool] = wds.reraise_exception,
    verify: Mapping[str, Mapping[str, Any]] | None = None,
) -> Iterator[dict[str, Any]]:
    """A DataPipeline stage: shard URLs (``{"url": ...}``) -> samples grouped by key.

    Files of one sample must be adjacent in the tar (as every WebDataset writer makes
    them); names starting with ``__`` are WebDataset metadata and skipped. ``handler``
    decides what a failing shard does (WebDataset's convention: True = skip the rest of
    this shard and go on, False = stop); its default re-raises. A shard cut short yields
    the samples whose files all precede the cut; the sample being read is dropped.

    ``verify`` maps a URL to its manifest record (``shards.check_shards`` builds it):
    ``{"sha256": hex, "truncated": False}``: the whole file is hashed while it streams,
    and at the end of the shard (before its last sample is yielded) a different sha256
    raises :class:`ShardChecksumError`, which no handler can skip.
    ``{"truncated": True}``: a shard known to be cut short; it is not hashed, and the
    cut ends it quietly after its complete samples. URLs not in ``verify`` are read as
    without it.
    """
    verify = verify or {}
    for item in urls:
        url = item["url"]
        record = verify.get(url) or {}
        cut_ok = bool(record.get("truncated"))
        expected = None if cut_ok else record.get("sha256")
        sample: dict[str, Any] | None = None
        try:
            with wds.gopen(url, "rb") as raw:
                stream, hexdigest = _hashing_stream(raw) if expected else (raw, None)
                try:
                    for name, data in iter_tar_files(stream, url):
                        parts = _split_key(name)
                        if parts is None or name.rsplit("/", 1)[-1].startswith("__"):
                            continue
                        key, ext = parts
                        if sample is None or sample["__key__"] != key:
                            if sample is not None:
                                yield sample
                            sample = {"__key__": key, "__url__": url}
                        if ext in sample:
                            raise TarFormatError(f"{url}: duplicate file {name} in one sample")
                        sample[ext] = data
                except TarTruncatedError:
                    if not cut_ok:
                        raise
                    sample = None  # the sample read at the cut may lack files
                if hexdigest is not None:
                    got = hexdigest()
                    if got != expected:
                        raise ShardChecksumError(
                            f"{url}: sha256 {got} does not match the manifest's {expected}; the shard was "
                            f"changed after it was written; {RERUN_HINT}"
                        )
            if sample is not None:
                yield sample
        except ShardChecksumError:
            raise
        except Exception as e:
            if not handler(e):
                return
