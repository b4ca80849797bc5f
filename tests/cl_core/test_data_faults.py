"""Damaged shard sets on real shards: a missing shard, a shard cut short, a shard whose
bytes were changed (same size or longer), and an old manifest without sizes."""

from __future__ import annotations

import json
import os

import pytest

from cl_core.data import shards as S
from cl_core.data import storage
from cl_core.data.sources import npz_source
from cl_core.data.tario import ShardChecksumError, TarFormatError, tar_samples
from infra import s3 as s3_backend
from tests.cl_core.test_shards import write_set


def _read(urls, verify=None, handler=None):
    kwargs = {"handler": handler} if handler else {}
    return list(tar_samples(({"url": u} for u in urls), verify=verify, **kwargs))


@pytest.fixture
def shard_set(npz_file, tmp_path):
    """A shard set of 60 images: 36 train samples in 5 shards."""
    out = tmp_path / "set"
    out.mkdir()
    return out, write_set(npz_source(npz_file), out, per_shard=8)


def _one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert len(text.splitlines()) == 1
    return text


def test_manifest_records_the_shard_sizes(shard_set):
    out, m = shard_set
    for split in S.SPLITS:
        for r in m["splits"][split]["shards"]:
            assert set(r) == {"name", "num_samples", "sha256", "bytes"}
            assert r["bytes"] == (out / r["name"]).stat().st_size
    assert json.loads((out / S.MANIFEST).read_text())["splits"] == m["splits"]


def test_untouched_set_reads_whole_and_verified(shard_set):
    out, m = shard_set
    check = S.check_shards(out, m, "train")
    urls, counts = S.shard_urls(out, m, "train")
    assert (check.urls, check.counts) == (urls, counts)
    assert check.truncated == [] and check.lost_samples == 0
    assert check.verify == {
        u: {"sha256": r["sha256"], "truncated": False}
        for u, r in zip(urls, m["splits"]["train"]["shards"], strict=True)
    }
    assert _read(check.urls, verify=check.verify) == _read(urls)
    assert len(_read(check.urls, verify=check.verify)) == sum(counts) == 36


def test_missing_shard_names_it(shard_set):
    out, m = shard_set
    urls, _ = S.shard_urls(out, m, "train")
    os.remove(urls[2])
    with pytest.raises(S.ShardError) as e:
        S.check_shards(out, m, "train")
    assert _one_line(e) == (
        f"{urls[2]}: shard listed in {out / S.MANIFEST} is missing from storage; "
        "rerun the shard stage (clpipe run --rerun shard)"
    )
    assert isinstance(e.value, FileNotFoundError)
    os.remove(urls[4])
    with pytest.raises(S.ShardError, match=r"\(1 more of the train split's shards are missing too\)"):
        S.check_shards(out, m, "train")
    S.check_shards(out, m, "val")  # the other splits are whole


@pytest.mark.parametrize("complete", [0, 3, 6])
def test_truncated_shard_keeps_its_complete_samples(shard_set, complete):
    """A shard cut inside the image of sample ``complete`` (counting from 0)."""
    out, m = shard_set
    urls, counts = S.shard_urls(out, m, "train")
    url = urls[1]
    full = _read([url])
    raw = open(url, "rb").read()
    pngs = [i for i in range(len(raw)) if raw.startswith(b"\x89PNG", i)]
    assert len(pngs) == counts[1] == len(full) == 7
    with open(url, "wb") as f:
        f.write(raw[: pngs[complete] + 30])

    check = S.check_shards(out, m, "train")
    if complete:
        assert check.urls == urls and check.counts == [counts[0], complete, *counts[2:]]
    else:  # no complete sample left: the shard is not read at all
        assert check.urls == [urls[0], *urls[2:]] and check.counts == [counts[0], *counts[2:]]
    assert check.truncated == [
        {
            "url": url,
            "expected_samples": 7,
            "readable_samples": complete,
            "expected_bytes": len(raw),
            "bytes": pngs[complete] + 30,
        }
    ]
    assert check.lost_samples == 7 - complete
    assert check.verify[url]["truncated"] is True
    # the readable samples, exactly, and the other shards still verified
    assert _read([url], verify=check.verify) == full[:complete]
    everything = _read(check.urls, verify=check.verify)
    assert len(everything) == sum(check.counts) == 36 - (7 - complete)
    # without the record the cut is an error, as for any damaged tar
    with pytest.raises(TarFormatError, match=f"{url}: truncated tar member at byte .* \\(shard cut short\\)"):
        _read([url])


def test_truncated_shard_with_no_sample_left_is_dropped(shard_set):
    out, m = shard_set
    urls, counts = S.shard_urls(out, m, "train")
    with open(urls[3], "r+b") as f:
        f.truncate(700)  # inside the first member
    check = S.check_shards(out, m, "train")
    assert check.urls == urls[:3] + urls[4:] and check.counts == counts[:3] + counts[4:]
    assert check.truncated[0]["readable_samples"] == 0 and check.lost_samples == counts[3]


def test_cut_in_the_end_padding_loses_nothing(shard_set):
    out, m = shard_set
    urls, counts = S.shard_urls(out, m, "train")
    size = os.path.getsize(urls[0])
    with open(urls[0], "r+b") as f:
        f.truncate(size - 700)  # tar's zero blocks after the last member
    check = S.check_shards(out, m, "train")
    assert check.counts == counts and check.lost_samples == 0
    assert check.truncated == [
        {
            "url": urls[0],
            "expected_samples": counts[0],
            "readable_samples": counts[0],
            "expected_bytes": size,
            "bytes": size - 700,
        }
    ]
    assert len(_read(check.urls, verify=check.verify)) == sum(counts)


def test_changed_byte_in_an_image_fails_the_checksum(shard_set):
    out, m = shard_set
    urls, _ = S.shard_urls(out, m, "train")
    url = urls[2]
    raw = bytearray(open(url, "rb").read())
    full = _read([url])
    at = raw.index(b"\x89PNG", raw.index(b"\x89PNG") + 1) + 60  # inside the second image
    raw[at] ^= 0x01
    open(url, "wb").write(bytes(raw))

    check = S.check_shards(out, m, "train")  # same size: nothing to see yet
    assert check.truncated == [] and check.lost_samples == 0
    assert len(_read([url])) == len(full)  # still a valid tar: only the checksum tells
    sha = S.sha256_file(url)
    expected = m["splits"]["train"]["shards"][2]["sha256"]
    with pytest.raises(ShardChecksumError) as e:
        _read(check.urls, verify=check.verify)
    assert _one_line(e) == (
        f"{url}: sha256 {sha} does not match the manifest's {expected}; the shard was "
        "changed after it was written; rerun the shard stage (clpipe run --rerun shard)"
    )
    # a handler that skips damaged shards does not skip this one
    seen: list[Exception] = []
    with pytest.raises(ShardChecksumError):
        _read(check.urls, verify=check.verify, handler=lambda exc: seen.append(exc) or True)
    assert seen == []
    # the error comes before the shard's last sample is handed out
    got: list[dict] = []
    with pytest.raises(ShardChecksumError):
        for s in tar_samples([{"url": url}], verify=check.verify):
            got.append(s)
    assert len(got) == len(full) - 1


def test_appended_bytes_fail_the_check(shard_set):
    out, m = shard_set
    urls, _ = S.shard_urls(out, m, "train")
    size = os.path.getsize(urls[1])
    with open(urls[1], "ab") as f:
        f.write(b"\0" * 1024)  # still a readable tar with the same samples
    assert len(_read([urls[1]])) == m["splits"]["train"]["shards"][1]["num_samples"]
    with pytest.raises(ShardChecksumError) as e:
        S.check_shards(out, m, "train")
    assert _one_line(e) == (
        f"{urls[1]}: {size + 1024} bytes where {out / S.MANIFEST} records {size}; the shard "
        "was changed after it was written; rerun the shard stage (clpipe run --rerun shard)"
    )


def test_manifest_without_sizes_still_loads(shard_set):
    """Sets written before sizes were recorded: no size check, the sha256 still holds."""
    out, m = shard_set
    for r in m["splits"]["train"]["shards"]:
        del r["bytes"]
    S.write_manifest(out, m)
    m = S.read_manifest(out)
    urls, counts = S.shard_urls(out, m, "train")
    check = S.check_shards(out, m, "train")
    assert (check.urls, check.counts, check.truncated) == (urls, counts, [])
    assert len(_read(check.urls, verify=check.verify)) == sum(counts)
    with open(urls[0], "r+b") as f:
        f.truncate(2000)
    check = S.check_shards(out, m, "train")  # not seen without a size ...
    assert check.truncated == [] and check.counts == counts
    with pytest.raises(TarFormatError, match=f"{urls[0]}: truncated tar"):  # ... but the read fails
        _read(check.urls, verify=check.verify)


@pytest.fixture
def s3(tmp_path):
    """A SeaweedFS S3 server (see tests/pipelines/test_s3.py) with a bucket; the AWS environment
    points at it during the test."""
    from tests.conftest import s3_server

    with s3_server(tmp_path / "weed", "clpipe-faults"):
        yield "s3://clpipe-faults"


def test_check_on_s3_uses_object_sizes(shard_set, s3):
    out, m = shard_set
    dest = S.publish(out, f"{s3}/sets/a")
    urls, counts = S.shard_urls(dest, m, "train")
    storage.write_bytes(f"{dest}/deeper/train-000000.tar", b"x")  # not a shard of this set
    check = S.check_shards(dest, m, "train")
    assert (check.urls, check.counts, check.lost_samples) == (urls, counts, 0)
    assert len(_read(check.urls, verify=check.verify)) == sum(counts)
    raw = storage.read_bytes(urls[0])
    storage.write_bytes(urls[0], raw[: raw.index(b"\x89PNG", raw.index(b"\x89PNG") + 1) + 30])
    s3_backend.client().delete_object(Bucket="clpipe-faults", Key=s3_backend.split_s3(urls[1])[1])
    with pytest.raises(S.ShardError, match=f"^{urls[1]}: shard listed in {dest}/manifest.json is missing"):
        S.check_shards(dest, m, "train")
    storage.write_bytes(urls[1], (out / m["splits"]["train"]["shards"][1]["name"]).read_bytes())
    check = S.check_shards(dest, m, "train")
    assert check.truncated[0]["readable_samples"] == 1 and check.lost_samples == counts[0] - 1
    assert len(_read(check.urls, verify=check.verify)) == sum(counts) - counts[0] + 1
