"""cl_core's storage layer: local paths, and URIs through a backend the layer above provides."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import webdataset as wds

from cl_core.data import shards as S
from cl_core.data import storage
from cl_core.data.sources import npz_source
from cl_core.data.tario import tar_samples
from tests.cl_core.test_shards import write_set

ROOT = Path(__file__).resolve().parents[2]


class MemoryStorage:
    """A whole storage backend in a dict: what any object store has to provide to cl_core."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    def _get(self, uri: str) -> bytes:
        if uri not in self.objects:
            raise storage.StorageError(f"{uri}: no such object")
        return self.objects[uri]

    def exists(self, uri: str) -> bool:
        return uri in self.objects

    def exists_any(self, uri: str) -> bool:
        return uri in self.objects or any(k.startswith(uri.rstrip("/") + "/") for k in self.objects)

    def list_files(self, uri: str) -> list[str]:
        return sorted(k for k in self.objects if k.startswith(uri.rstrip("/") + "/"))

    def sizes(self, uri: str) -> dict[str, int]:
        base = uri.rstrip("/") + "/"
        direct = {k[len(base) :]: v for k, v in self.objects.items() if k.startswith(base)}
        return {name: len(v) for name, v in direct.items() if "/" not in name}

    def read_bytes(self, uri: str) -> bytes:
        return self._get(uri)

    read_object = read_bytes

    def open_read(self, uri: str) -> io.BytesIO:
        return io.BytesIO(self._get(uri))

    def write_bytes(self, uri: str, data: bytes) -> None:
        self.objects[uri] = bytes(data)

    def upload_file(self, path: str | os.PathLike, uri: str) -> None:
        self.objects[uri] = Path(path).read_bytes()

    def download_file(self, uri: str, path: str | os.PathLike) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(self._get(uri))

    def delete_prefix(self, uri: str) -> int:
        gone = self.list_files(uri)
        for k in gone:
            del self.objects[k]
        return len(gone)

    def check(self, uri: str) -> None:
        if not uri.startswith("mem://bucket/"):
            raise storage.StorageError(f"{uri}: no such bucket; write mem://bucket/...")


@pytest.fixture
def mem():
    backend = MemoryStorage()
    storage.register("mem", backend)
    yield backend
    storage._backends.pop("mem", None)
    sys.modules["webdataset.gopen"].gopen_schemes.pop("mem", None)


def test_a_uri_without_a_backend_is_one_line_naming_it_and_the_fix():
    with pytest.raises(storage.StorageError) as e:
        storage.read_bytes("nowhere://bucket/a.tar")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("nowhere://bucket/a.tar: no storage backend for nowhere://")
    assert "register('nowhere', backend)" in msg
    assert storage.scheme("s3://b/k") == "s3" and storage.scheme("/tmp/x") is None and not storage.is_remote("rel/x")


def test_a_shard_set_in_a_registered_backend_reads_as_on_disk(npz_file, tmp_path, mem):
    """Everything cl_core does with shards in storage goes through the backend: writing,
    listing sizes, checking against the manifest and streaming with webdataset."""
    out = tmp_path / "shards"
    out.mkdir()
    manifest = write_set(npz_source(npz_file), out)
    for p in sorted(out.iterdir()):
        storage.upload_file(p, storage.join("mem://bucket/set", p.name))
    storage.write_bytes("mem://bucket/set/deeper/x.tar", b"not a shard of the set")
    assert storage.exists("mem://bucket/set/manifest.json") and storage.exists_any("mem://bucket/set")
    assert storage.sizes("mem://bucket/set") == storage.sizes(out)  # the nested object is not listed
    assert S.stored_sizes("mem://bucket/set") == S.stored_sizes(out)
    assert len(storage.list_files("mem://bucket/set")) == len(list(out.iterdir())) + 1

    for split in S.SPLITS:
        check = S.check_shards("mem://bucket/set", manifest, split)
        assert not check.truncated and check.counts == [sh["num_samples"] for sh in manifest["splits"][split]["shards"]]
        names = [sh["name"] for sh in manifest["splits"][split]["shards"]]
        local = list(tar_samples({"url": str(out / n)} for n in names))
        remote = list(tar_samples({"url": f"mem://bucket/set/{n}"} for n in names))
        assert [s["__key__"] for s in remote] == [s["__key__"] for s in local]
        assert all(a[k] == b[k] for a, b in zip(local, remote, strict=True) for k in a if not k.startswith("__"))
    with wds.gopen("mem://bucket/set/manifest.json") as f:  # webdataset's own opener routes the scheme here
        assert f.read() == (out / "manifest.json").read_bytes()

    storage.download_dir("mem://bucket/set", tmp_path / "back")
    assert (tmp_path / "back" / "deeper" / "x.tar").read_bytes() == b"not a shard of the set"
    with pytest.raises(storage.StorageError, match="^mem://elsewhere/x: no such bucket"):
        storage.check("mem://elsewhere/x")
    storage.check(tmp_path)  # a local path passes
    assert storage.delete_prefix("mem://bucket/set") == len(list(out.iterdir())) + 1
    assert not storage.exists_any("mem://bucket/set")


def test_cl_core_alone_finds_the_s3_backend_by_its_entry_point_without_importing_boto3():
    """A process that imports only cl_core (a spawned DataLoader worker, a user's script)
    gets s3:// from the installed entry point; boto3 loads only when S3 is used."""
    code = (
        "import sys\n"
        "from cl_core.data import storage, reader, shards, sources\n"
        "assert 'boto3' not in sys.modules and 'infra' not in sys.modules and 'pipelines' not in sys.modules\n"
        "assert sys.modules['webdataset.gopen'].gopen_schemes['s3'] is storage._gopen\n"
        "b = storage.backend('s3://bucket/key')\n"
        "print(type(b).__module__, type(b).__name__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    ).stdout
    assert out.split() == ["infra.s3", "S3Storage"]
