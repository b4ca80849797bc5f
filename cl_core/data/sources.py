"""Image sources: scikit-learn's bundled digits, an image folder, a .npz array file, a
folder of IDX files (MNIST, Fashion-MNIST, KMNIST, EMNIST).

A source lists its samples (id, label) cheaply and encodes one sample on demand, so the
shard writer can split the list into chunks and encode them in parallel. Each source
is described by a small picklable spec (``describe()``) from which a worker rebuilds it.
"""

from __future__ import annotations

import io
import os
import shutil
import time
import zipfile
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from cl_core.data import storage

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


class SourceError(ValueError):
    """A source cannot be read at all (as opposed to one bad image in it)."""


class UndecodableImage(ValueError):
    """One source image that does not decode: the shard writer skips it, counts it and
    lists it in the manifest. Nothing else counts as a corrupt image."""


class SourceReadError(OSError):
    """A source file that could not be read (after retries): the shard task fails with
    this one line, and nothing is dropped or cached."""


READ_ATTEMPTS = 4
READ_BACKOFF_S = 0.5  # doubled after each failed attempt
# GETs in flight per shard task for a source under s3:// (one object per image; pyarrow's
# S3 client, which waits without the GIL): one at a time, a task mostly waited on round trips
S3_READS_IN_FLIGHT = int(os.environ.get("CLPIPE_S3_READS_IN_FLIGHT", "16"))
_readers: ThreadPoolExecutor | None = None  # per process, kept across the shard tasks a Ray worker runs


def _reader_pool() -> ThreadPoolExecutor:
    global _readers
    if _readers is None:
        _readers = ThreadPoolExecutor(max(1, S3_READS_IN_FLIGHT), thread_name_prefix="clpipe-source-read")
    return _readers


def read_source_bytes(path: str, read: Callable[[str], bytes] | None = None) -> bytes:
    """A source file's bytes, by ``read`` (default :func:`storage.read_bytes`). An I/O
    error (a throttled or broken S3 read, a timeout, a path missing on this node) is
    retried with exponential backoff, then raised as a :class:`SourceReadError` naming
    the file."""
    read = read or storage.read_bytes
    for attempt in range(READ_ATTEMPTS - 1):
        try:
            return read(path)
        except OSError:
            time.sleep(READ_BACKOFF_S * 2**attempt)
    try:
        return read(path)
    except OSError as e:
        cause = (str(e).splitlines() or [""])[0][:300]
        raise SourceReadError(
            f"data.source: cannot read {path} ({type(e).__name__}: {cause}) after {READ_ATTEMPTS} attempts; "
            "every node that writes shards must reach the source: a path on each of them (or a shared "
            "mount), or s3://..."
        ) from None


@dataclass(frozen=True)
class SampleRef:
    index: int  # position in the source
    id: str  # stable source id (file path relative to the root, or "name-%06d")
    label: int  # -1 when unlabeled


def encode_png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class Source:
    kind: str = ""
    class_names: list[str]

    def refs(self) -> list[SampleRef]:
        raise NotImplementedError

    def encode(self, ref: SampleRef) -> tuple[bytes, str]:
        """(image bytes, extension) of one sample; raises :class:`UndecodableImage` for an
        image that does not decode and :class:`SourceReadError` for one that cannot be read."""
        raise NotImplementedError

    def encoded(self, refs: Sequence[SampleRef]) -> Iterator[tuple[SampleRef, Callable[[], tuple[bytes, str]]]]:
        """``refs`` in order, each with a call that gives what :meth:`encode` gives (and
        raises what it raises). A source whose reads wait on the network fetches ahead
        here, several at a time; the default encodes one sample after the other."""
        for r in refs:
            yield r, partial(self.encode, r)

    def describe(self) -> dict:
        raise NotImplementedError

    @property
    def labeled(self) -> bool:
        return bool(self.class_names)

    def release(self) -> None:
        """Drop what reading samples left behind (a memory map's touched pages count in
        the process's RSS until it is unmapped); the next read reopens it."""

    def stage(self, scratch: str | Path) -> None:
        """Make the source cheap to read from many tasks at once, using ``scratch`` (a
        folder every node sees) if it needs room; most sources have nothing to do."""

    def official_test(self) -> set[int] | None:
        """The indices of the source's own test set (kept whole as the test split instead
        of a random share), or None when it has none."""
        return None


class MappedImages:
    """uint8 images in the ``.npy`` payload at ``offset`` in ``file`` (a plain .npy, or a
    member stored uncompressed in a .npz). Pickled as that location, not as the bytes.
    :meth:`read` fetches one image with one positioned read, so a shard task holds only
    the image it encodes: nobody holds the whole array in memory. (A memory map would
    do in principle, but the kernel's read-around on each page fault maps far more than
    the image: 1,000 random 3 KB images mapped 250 MB of a 300 MB file, all counted in
    the worker's RSS.) :attr:`array` maps the file, for whole-array use."""

    def __init__(self, file: str, offset: int, shape: tuple[int, ...], fortran: bool, squeeze: bool = False):
        self.file, self.offset, self.shape, self.fortran, self.squeeze = file, offset, tuple(shape), fortran, squeeze
        self._array: np.ndarray | None = None
        self._fd: int | None = None

    def read(self, index: int) -> np.ndarray:
        """Image ``index`` as a fresh array."""
        if self.fortran:  # one image's pixels are not contiguous in the file
            return np.ascontiguousarray(self.array[index])
        size = int(np.prod(self.shape[1:]))
        if self._fd is None:
            self._fd = os.open(self.file, os.O_RDONLY)
        buf = os.pread(self._fd, size, self.offset + index * size)
        if len(buf) != size:
            raise SourceReadError(f"data.source: {self.file} ends inside image {index}; the file is truncated")
        a = np.frombuffer(buf, dtype=np.uint8).reshape(self.shape[1:])
        return a[..., 0] if self.squeeze else a

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            a: np.ndarray = np.memmap(
                self.file,
                dtype=np.uint8,
                mode="r",
                offset=self.offset,
                shape=self.shape,
                order="F" if self.fortran else "C",
            )
            self._array = a[..., 0] if self.squeeze else a
        return self._array

    def release(self) -> None:
        self._array = None  # the last reference: the map is closed
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_array": None, "_fd": None}


class ArraySource(Source):
    """Images as uint8 (N, H, W) or (N, H, W, C): held in memory, or memory-mapped from a
    file (:class:`MappedImages`)."""

    def __init__(
        self,
        images: np.ndarray | MappedImages,
        labels: np.ndarray | None,
        class_names: list[str],
        prefix: str,
        spec: dict,
    ):
        self._images, self.labels, self.class_names, self.prefix, self._spec = images, labels, class_names, prefix, spec

    @property
    def images(self) -> np.ndarray:
        return self._images.array if isinstance(self._images, MappedImages) else self._images

    def release(self) -> None:
        if isinstance(self._images, MappedImages):
            self._images.release()

    def refs(self) -> list[SampleRef]:
        lab = self.labels if self.labels is not None else np.full(len(self.images), -1)
        return [SampleRef(i, f"{self.prefix}-{i:06d}", int(lab[i])) for i in range(len(self.images))]

    def encode(self, ref: SampleRef) -> tuple[bytes, str]:
        if isinstance(self._images, MappedImages):
            return encode_png(self._images.read(ref.index)), "png"
        return encode_png(np.ascontiguousarray(self.images[ref.index])), "png"

    def describe(self) -> dict:
        return dict(self._spec)


def digits_source() -> ArraySource:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes),
    scaled from 0..16 to 0..255 grayscale."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8)
    return ArraySource(images, d.target.astype(np.int64), [str(c) for c in range(10)], "digits", {"kind": "digits"})


def _npy_header(f: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f)
    return tuple(shape), bool(fortran), np.dtype(dtype)


class NpzSource(ArraySource):
    """A local ``.npz``: its ``images`` member is never read whole into memory. Stored
    uncompressed (``np.savez``), it is memory-mapped where it lies in the file; compressed
    (``np.savez_compressed``), :meth:`stage` unpacks it once, streaming, into a scratch
    folder that the shard tasks map (before that, reads decompress it into memory)."""

    def __init__(
        self,
        path: Path,
        shape: tuple[int, ...],
        fortran: bool,
        offset: int | None,
        labels: np.ndarray | None,
        class_names: list[str],
        spec: dict,
    ):
        self.path, self.shape, self.fortran = path, shape, fortran
        squeeze = len(shape) == 4 and shape[-1] == 1
        images: np.ndarray | MappedImages | None = None
        if offset is not None:
            images = MappedImages(str(path), offset, shape, fortran, squeeze)
        super().__init__(images, labels, class_names, path.stem, spec)  # type: ignore[arg-type]
        self.squeeze = squeeze

    @property
    def images(self) -> np.ndarray:
        if self._images is None:  # compressed and not staged: decompress into memory
            with np.load(self.path, allow_pickle=False) as z:
                a = z["images"]
            self._images = a[..., 0] if self.squeeze else a
        return super().images

    def refs(self) -> list[SampleRef]:
        lab = self.labels if self.labels is not None else np.full(self.shape[0], -1)
        return [SampleRef(i, f"{self.prefix}-{i:06d}", int(lab[i])) for i in range(self.shape[0])]

    def stage(self, scratch: str | Path) -> None:
        if isinstance(self._images, MappedImages):
            return
        dst = Path(scratch) / f".{self.path.stem}-images.npy"
        with zipfile.ZipFile(self.path) as z, z.open("images.npy") as src, open(dst, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        with open(dst, "rb") as f:
            _npy_header(f)
            offset = f.tell()
        self._images = MappedImages(str(dst), offset, self.shape, self.fortran, self.squeeze)


def _open_local_npz(path: Path) -> NpzSource:
    spec = {"kind": "npz", "path": str(path.resolve())}
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            if "images.npy" not in names:
                found = ", ".join(n.removesuffix(".npy") for n in names)
                raise SourceError(
                    f"data.source.path: {path} has no 'images' array (found: {found}); save images as "
                    "uint8 NHWC under 'images'"
                )
            info = z.getinfo("images.npy")
            with z.open(info) as f:
                shape, fortran, dtype = _npy_header(f)
                header = f.tell() if info.compress_type == zipfile.ZIP_STORED else None
            labels = None
            if "labels.npy" in names:
                with z.open("labels.npy") as f:
                    labels = np.lib.format.read_array(f, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        if isinstance(e, SourceError):
            raise
        raise SourceError(f"data.source.path: {path} is not a readable .npz file ({e})") from e
    offset = None
    if header is not None:  # the member's data starts after its local header (30 bytes + name + extra)
        with open(path, "rb") as raw:
            raw.seek(info.header_offset)
            local = raw.read(30)
            name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
            offset = info.header_offset + 30 + name_len + extra_len + header
    _check_arrays(path, dtype, shape, labels)
    labels, class_names = _labels(labels)
    return NpzSource(path, shape, fortran, offset, labels, class_names, spec)


def _check_arrays(path: str | Path, dtype: np.dtype, shape: tuple[int, ...], labels: np.ndarray | None) -> None:
    if dtype != np.uint8:
        raise SourceError(
            f"data.source.path: {path}: 'images' must be uint8, got {dtype}; convert with images.astype(np.uint8)"
        )
    if len(shape) not in (3, 4) or (len(shape) == 4 and shape[-1] not in (1, 3, 4)):
        raise SourceError(
            f"data.source.path: {path}: 'images' must be N x H x W or N x H x W x C (C=1,3,4), got shape {shape}"
        )
    if labels is not None and (
        labels.shape != (shape[0],) or not np.issubdtype(labels.dtype, np.integer) or (len(labels) and labels.min() < 0)
    ):
        raise SourceError(
            f"data.source.path: {path}: 'labels' must be non-negative integers of shape ({shape[0]},)"
            f", got {labels.dtype} {labels.shape}"
        )


def _labels(labels: np.ndarray | None) -> tuple[np.ndarray | None, list[str]]:
    if labels is None:
        return None, []
    labels = labels.astype(np.int64)
    return labels, ([str(c) for c in range(int(labels.max()) + 1)] if len(labels) else [])


def npz_source(path: str | Path) -> ArraySource:
    """A ``.npz`` file with ``images`` (uint8, N x H x W [x C], C in 1/3/4) and optional
    integer ``labels`` (N,) with values 0..K-1. A local file is memory-mapped
    (:class:`NpzSource`); one in S3 is read into memory."""
    if not storage.is_remote(path):
        path = Path(path)
        if not path.is_file():
            raise SourceError(f"data.source.path: {path} does not exist; give an existing .npz file")
        return _open_local_npz(path)
    spec_path, stem = str(path), str(path).rstrip("/").rsplit("/", 1)[-1].removesuffix(".npz")
    try:
        blob: Any = io.BytesIO(storage.read_bytes(str(path)))
    except storage.StorageError as e:
        raise SourceError(f"data.source.path: {e}") from None
    try:
        with np.load(blob, allow_pickle=False) as z:
            if "images" not in z:
                raise SourceError(
                    f"data.source.path: {path} has no 'images' array (found: {', '.join(z.files)})"
                    f"; save images as uint8 NHWC under 'images'"
                )
            images = z["images"]
            labels = z["labels"] if "labels" in z else None
    except (OSError, ValueError) as e:
        if isinstance(e, SourceError):
            raise
        raise SourceError(f"data.source.path: {path} is not a readable .npz file ({e})") from e
    _check_arrays(path, images.dtype, images.shape, labels)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    labels, class_names = _labels(labels)
    return ArraySource(images, labels, class_names, stem, {"kind": "npz", "path": spec_path})


class ImageFolderSource(Source):
    """A folder of images: ``root/CLASS/xxx.png`` (labeled, classes in sorted order) or
    flat ``root/xxx.png`` (unlabeled), on the local disk or under an ``s3://`` prefix
    (one object per image). Files are decoded only when shards are written."""

    kind = "image_folder"

    def __init__(self, root: str | Path):
        self.uri = str(root)
        if storage.is_remote(self.uri):
            self._init_s3()
            return
        self.root = Path(root)
        if not self.root.is_dir():
            raise SourceError(
                f"data.source.path: {self.root} is not a directory; give a folder of images (class subfolders or flat)"
            )
        subdirs = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if subdirs:
            self.class_names = [d.name for d in subdirs]
            files = [(f, ci) for ci, d in enumerate(subdirs) for f in sorted(d.rglob("*")) if _is_image(f)]
        else:
            self.class_names = []
            files = [(f, -1) for f in sorted(self.root.iterdir()) if _is_image(f)]
        self._files = [(str(f), str(f.relative_to(self.root)), lab) for f, lab in files]

    def _init_s3(self) -> None:
        base = self.uri.rstrip("/") + "/"
        rel = [(u, u[len(base) :]) for u in storage.list_files(self.uri)]
        rel = [(u, r) for u, r in rel if _is_image_name(r)]
        if not rel:
            raise SourceError(
                f"data.source.path: {self.uri} holds no images (.png, .jpg, ...); upload them as "
                "PREFIX/CLASS/xxx.png or PREFIX/xxx.png"
            )
        nested = [r for _, r in rel if "/" in r]
        if nested:
            self.class_names = sorted({r.split("/", 1)[0] for r in nested})
            index = {c: i for i, c in enumerate(self.class_names)}
            self._files = [(u, r, index[r.split("/", 1)[0]]) for u, r in rel if "/" in r]
        else:
            self.class_names = []
            self._files = [(u, r, -1) for u, r in rel]

    def refs(self) -> list[SampleRef]:
        return [SampleRef(i, rel, lab) for i, (_, rel, lab) in enumerate(self._files)]

    def encode(self, ref: SampleRef) -> tuple[bytes, str]:
        return self._encode_bytes(ref, read_source_bytes(self._files[ref.index][0]))

    def encoded(self, refs: Sequence[SampleRef]) -> Iterator[tuple[SampleRef, Callable[[], tuple[bytes, str]]]]:
        """Under a storage URI (``s3://``), up to :data:`S3_READS_IN_FLIGHT` reads (:func:`storage.read_object`)
        run ahead of the sample being encoded, in order, a read's error surfacing at its
        own sample; a local folder reads one file after the other."""
        if not storage.is_remote(self.uri) or S3_READS_IN_FLIGHT <= 1:
            yield from super().encoded(refs)
            return
        pool, ahead = _reader_pool(), deque[tuple[SampleRef, Future[bytes]]]()
        todo = iter(refs)
        try:
            while True:
                while len(ahead) < S3_READS_IN_FLIGHT and (r := next(todo, None)) is not None:
                    ahead.append((r, pool.submit(read_source_bytes, self._files[r.index][0], storage.read_object)))
                if not ahead:
                    return
                r, fut = ahead.popleft()
                yield r, partial(self._encode_future, r, fut)
        finally:  # the consumer stopped early (a failed shard): drop the reads not yet started
            for _, fut in ahead:
                fut.cancel()

    def _encode_future(self, ref: SampleRef, fut: Future[bytes]) -> tuple[bytes, str]:
        return self._encode_bytes(ref, fut.result())

    def _encode_bytes(self, ref: SampleRef, data: bytes) -> tuple[bytes, str]:
        path = self._files[ref.index][0]
        try:
            with Image.open(io.BytesIO(data)) as im:
                fmt = im.format
                im.load()  # full decode: truncated files fail here, not in training
                if fmt == "JPEG":
                    return data, "jpg"
                if fmt == "PNG":
                    return data, "png"
                arr = np.asarray(im.convert("RGB" if im.mode not in ("L", "RGB") else im.mode))
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise UndecodableImage(f"cannot decode {path}: {e}") from e
        return encode_png(arr), "png"

    def describe(self) -> dict:
        return {"kind": "image_folder", "path": self.uri if storage.is_remote(self.uri) else str(self.root.resolve())}


def _is_image(p: Path) -> bool:
    return p.is_file() and _is_image_name(p.name)


def _is_image_name(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return "." in base and f".{base.rsplit('.', 1)[1].lower()}" in IMAGE_EXTS and not base.startswith(".")


IDX_TYPES = {0x08: np.dtype(np.uint8)}  # unsigned byte: what the MNIST family stores
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_HINT = (
    "a folder holding train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
    "t10k-labels-idx1-ubyte (each may end in .gz, and carry a prefix such as emnist-balanced-)"
)


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """One IDX file (plain or gzipped): the magic (two zero bytes, the element type, the
    number of dimensions), the dimensions as big-endian uint32, then the data. One-line
    SourceError for a file that is not that, has another shape or is cut short."""
    import gzip

    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise SourceError(f"data.source.path: {path}: a damaged gzip file ({e}); download it again") from None
    kind = "images (idx3)" if ndim == 3 else "labels (idx1)"
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in IDX_TYPES or raw[3] != ndim:
        raise SourceError(
            f"data.source.path: {path}: not an IDX file of {kind}: magic {raw[:4].hex() or 'missing'}, "
            f"expected 0000080{ndim}; give the {kind.split()[0]} file of the data set"
        )
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise SourceError(f"data.source.path: {path}: truncated in its header; download it again")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    dtype = IDX_TYPES[raw[2]]
    want = head + int(np.prod(dims)) * dtype.itemsize
    if len(raw) != want:
        what = "truncated" if len(raw) < want else "longer than its header says"
        raise SourceError(
            f"data.source.path: {path}: {what}: {len(raw) - head} data bytes for dimensions "
            f"{'x'.join(map(str, dims))} ({want - head} expected); download it again"
        )
    return np.frombuffer(raw, dtype=dtype, offset=head).reshape(dims)


def _idx_file(folder: Path, name: str) -> Path:
    found = sorted(p for p in folder.iterdir() if p.name.removesuffix(".gz").endswith(name) and p.is_file())
    if len(found) != 1:
        what = "no file" if not found else f"{len(found)} files ({', '.join(p.name for p in found)})"
        raise SourceError(f"data.source.path: {folder} has {what} named *{name}[.gz]; give {IDX_HINT}")
    return found[0]


class IdxSource(ArraySource):
    """A data set in IDX files (MNIST, Fashion-MNIST, KMNIST, EMNIST): the train images
    and labels, and the official test images and labels, which stay the test split."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).expanduser()
        if not self.folder.is_dir():
            raise SourceError(f"data.source.path: {self.folder} is not a directory; give {IDX_HINT}")
        parts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for split, (img_name, lab_name) in IDX_FILES.items():
            img_path, lab_path = _idx_file(self.folder, img_name), _idx_file(self.folder, lab_name)
            images, labels = read_idx(img_path, 3), read_idx(lab_path, 1)
            if len(images) != len(labels):
                raise SourceError(
                    f"data.source.path: {img_path.name} holds {len(images)} images but "
                    f"{lab_path.name} {len(labels)} labels; the two files must belong together"
                )
            parts[split] = images, labels.astype(np.int64)
        (tr_x, tr_y), (te_x, te_y) = parts["train"], parts["test"]
        if tr_x.shape[1:] != te_x.shape[1:]:
            raise SourceError(
                f"data.source.path: {self.folder}: train images are {tr_x.shape[1]}x{tr_x.shape[2]}, "
                f"test images {te_x.shape[1]}x{te_x.shape[2]}; the files are of two data sets"
            )
        labels = np.concatenate([tr_y, te_y])
        n_classes = int(labels.max()) + 1 if len(labels) else 0
        self.n_train = len(tr_x)
        super().__init__(
            np.concatenate([tr_x, te_x]),
            labels,
            [str(c) for c in range(n_classes)],
            self.folder.name or "idx",
            {"kind": "idx", "path": str(self.folder.resolve())},
        )

    def refs(self) -> list[SampleRef]:
        """Ids name the file and the position in it: ``train-000123``, ``test-000045``."""
        assert self.labels is not None
        return [
            SampleRef(i, f"train-{i:06d}" if i < self.n_train else f"test-{i - self.n_train:06d}", int(self.labels[i]))
            for i in range(len(self.images))
        ]

    def official_test(self) -> set[int] | None:
        return set(range(self.n_train, len(self.images)))


def open_source(spec: dict) -> Source:
    """Rebuild a source from its spec: {"kind": "digits"} | {"kind": "image_folder",
    "path": ...} | {"kind": "npz", "path": ...} | {"kind": "idx", "path": ...}."""
    kind = spec.get("kind")
    if kind == "digits":
        return digits_source()
    if kind == "npz":
        return npz_source(spec["path"])
    if kind == "image_folder":
        return ImageFolderSource(spec["path"])
    if kind == "idx":
        return IdxSource(spec["path"])
    raise SourceError(f"data.source.kind: unknown source kind {kind!r}; known: digits, idx, image_folder, npz")
