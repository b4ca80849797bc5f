"""The fast tar reader gives exactly WebDataset's samples, and refuses corrupt shards."""

import io
import tarfile

import pytest
import webdataset as wds

from cl_core.data import shards as S
from cl_core.data.sources import npz_source
from cl_core.data.tario import TarFormatError, iter_tar_files, tar_samples
from tests.cl_core.test_shards import write_set


def _wds_samples(urls):
    return list(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()))


def _ours(urls, handler=wds.reraise_exception):
    return list(tar_samples(({"url": u} for u in urls), handler=handler))


def test_same_samples_as_webdataset_on_project_shards(npz_file, tmp_path):
    m = write_set(npz_source(npz_file), tmp_path, per_shard=7)
    urls, counts = S.shard_urls(tmp_path, m, "train")
    ours = _ours(urls)
    assert ours == _wds_samples(urls) and len(ours) == sum(counts)
    assert set(ours[0]) == {"__key__", "__url__", "png", "cls", "json"}


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_long_names_directories_and_formats(tmp_path, fmt):
    """Other writers' tars: a directory entry, a name > 100 characters (pax record, GNU
    long name or ustar prefix), float mtimes (pax), a symlink, members of 0 and 512 bytes."""
    path = tmp_path / "other.tar"
    deep = "d" * 60 + "/" + "e" * 60  # 121 characters with the file name: too long for the name field
    files = {f"{deep}/a.txt": b"x" * 513, f"{deep}/a.cls": b"3", "top/b.txt": b"", "top/b.cls": b"1" * 512}
    with tarfile.open(path, "w", format=fmt) as tar:
        d = tarfile.TarInfo("top")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime = len(data), 1.5e9 + 0.25
            tar.addfile(ti, io.BytesIO(data))
        link = tarfile.TarInfo("top/link")
        link.type, link.linkname = tarfile.SYMTYPE, "b.txt"
        tar.addfile(link)
    with open(path, "rb") as f:
        assert dict(iter_tar_files(f)) == files
    assert _ours([str(path)]) == _wds_samples([str(path)])


def test_bad_checksum_names_the_shard(npz_file, tmp_path):
    m = write_set(npz_source(npz_file), tmp_path)
    url = S.shard_urls(tmp_path, m, "train")[0][0]
    raw = bytearray(open(url, "rb").read())
    raw[1024 + 3] ^= 0xFF  # flip a byte in the name field of the third member's header
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(raw))
    with pytest.raises(TarFormatError, match=r"bad\.tar: bad tar header checksum at byte 1024"):
        _ours([str(bad)])


def test_truncated_shard_raises_or_keeps_the_complete_samples(npz_file, tmp_path):
    m = write_set(npz_source(npz_file), tmp_path, per_shard=20, min_shards=1)
    url = S.shard_urls(tmp_path, m, "train")[0][0]
    raw = open(url, "rb").read()
    full = _ours([url])
    sample_bytes = sum(512 + -(-len(v) // 512) * 512 for k, v in full[0].items() if not k.startswith("__"))
    assert len({sum(512 + -(-len(v) // 512) * 512 for k, v in s.items() if not k.startswith("__")) for s in full}) == 1
    cut = tmp_path / "cut.tar"
    cut.write_bytes(raw[: 5 * sample_bytes + 1024 + 700])  # in the 2nd member of the 6th sample
    with pytest.raises(TarFormatError, match="cut.tar: truncated tar member at byte"):
        _ours([str(cut)])
    seen: list[Exception] = []
    kept = _ours([str(cut), url], handler=lambda e: seen.append(e) or True)
    assert len(seen) == 1  # complete samples only, then the next shard
    assert [s["__key__"] for s in kept] == [s["__key__"] for s in full[:5] + full]
    assert [s["png"] for s in kept[:5]] == [s["png"] for s in full[:5]]


def test_equal_inputs_give_byte_identical_shards(npz_file, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    ma, mb = write_set(npz_source(npz_file), a), write_set(npz_source(npz_file), b)
    assert [s["sha256"] for s in ma["splits"]["train"]["shards"]] == [
        s["sha256"] for s in mb["splits"]["train"]["shards"]
    ]
