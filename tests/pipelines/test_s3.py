"""S3 storage against a real SeaweedFS server on 127.0.0.1: the storage layer (objects,
listing, streaming reads that survive broken connections, one-line errors within a
bounded time), and the pipeline writing its shards, label subsets, Ray checkpoints and
MLflow artifacts to S3 and training from there."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from cl_core.data import storage
from infra import s3 as s3_backend
from tests.conftest import s3_server

BUCKET = "clpipe-test"
# one xdist process runs this module (its tests share the module's server): tests/conftest.py LANES


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A SeaweedFS S3 server with credentials; the AWS environment points at it while
    the module runs."""
    with s3_server(tmp_path_factory.mktemp("weed"), BUCKET) as server:
        yield server


def test_objects_listing_and_prefixes(s3):
    base = f"s3://{BUCKET}/basics"
    storage.write_bytes(f"{base}/a/x.bin", b"x" * 10)
    storage.write_bytes(f"{base}/a/y.bin", b"yy")
    assert storage.read_bytes(f"{base}/a/x.bin") == b"x" * 10
    assert storage.list_files(base) == [f"{base}/a/x.bin", f"{base}/a/y.bin"]
    assert storage.exists(f"{base}/a/y.bin") and not storage.exists(f"{base}/a/z.bin")
    assert storage.exists_any(f"{base}/a") and not storage.exists_any(f"{base}/b")
    assert storage.delete_prefix(f"{base}/a") == 2 and storage.list_files(base) == []


@pytest.mark.parametrize(
    "change,message",
    [
        ({"uri": "s3://no-such-bucket/x"}, "bucket 'no-such-bucket' does not exist"),
        ({"AWS_SECRET_ACCESS_KEY": "wrong"}, "refused the credentials"),
        ({"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, "cannot reach the S3 endpoint http://127.0.0.1:9"),
        ({"uri": f"s3://{BUCKET}/missing.bin"}, "no such object"),
    ],
)
def test_errors_are_one_line_and_bounded(s3, monkeypatch, change, message):
    storage.write_bytes(f"s3://{BUCKET}/errors/x.bin", b"x")
    uri = change.pop("uri", f"s3://{BUCKET}/errors/x.bin")
    for k, v in change.items():
        monkeypatch.setenv(k, v)
    t0 = time.monotonic()
    with pytest.raises(storage.StorageError) as e:
        storage.read_bytes(uri)
    assert message in str(e.value) and len(str(e.value).splitlines()) == 1
    assert uri in str(e.value) and s3.secret_key not in str(e.value)
    assert time.monotonic() - t0 < 20


class CuttingProxy:
    """A TCP proxy to the S3 server that breaks the first ``cuts`` connections after
    ``after`` bytes of response: a network that fails mid-object."""

    def __init__(self, target: str, cuts: int, after: int) -> None:
        host, port = target.removeprefix("http://").split(":")
        self.target = (host, int(port))
        self.cuts, self.after, self.cut = cuts, after, 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._pipe, args=(client,), daemon=True).start()

    def _pipe(self, client: socket.socket) -> None:
        upstream = socket.create_connection(self.target)
        cut = self.cut < self.cuts
        self.cut += cut

        def up() -> None:
            try:
                while data := client.recv(65536):
                    upstream.sendall(data)
            except OSError:
                pass

        threading.Thread(target=up, daemon=True).start()
        sent = 0
        try:
            while data := upstream.recv(65536):
                if cut and sent + len(data) > self.after:
                    client.sendall(data[: self.after - sent])
                    break
                client.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for s in (client, upstream):  # shutdown: a close alone leaves the other thread's recv holding the socket
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.sock.close()


def test_a_stream_broken_mid_object_resumes_with_ranged_gets(s3, monkeypatch):
    payload = os.urandom(3 << 20)
    uri = f"s3://{BUCKET}/stream/big.bin"
    storage.write_bytes(uri, payload)
    proxy = CuttingProxy(s3.endpoint, cuts=3, after=700_000)  # the GET and its first two resumptions break
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    try:
        t0 = time.monotonic()
        reader = s3_backend.S3Reader(uri)
        chunks = []
        while chunk := reader.read(1 << 16):
            chunks.append(chunk)
        assert b"".join(chunks) == payload and reader.failures == 3
        assert time.monotonic() - t0 < 15  # backoff 0.5 + 1 + 2 s
        # a network that keeps failing: bounded retries, then one line naming the object
        always = CuttingProxy(s3.endpoint, cuts=100, after=200_000)
        monkeypatch.setenv("AWS_ENDPOINT_URL", always.endpoint)
        t0 = time.monotonic()
        with pytest.raises(storage.StorageError, match=f"{uri}: the read failed {s3_backend.RETRIES + 1} times"):
            storage.read_bytes(uri)
        assert time.monotonic() - t0 < 30
        always.close()
    finally:
        proxy.close()


@pytest.mark.slow
def test_pipeline_shards_checkpoints_and_artifacts_in_s3(s3, tmp_path, capsys):
    """Shard -> labels -> sweep -> pretrain -> finetune with every location in S3: the
    shard and label sets are uploaded (manifest last) and streamed back by the Ray Train
    workers and Tune trials, checkpoints and the Tune experiment go to Ray's S3 storage
    path, MLflow artifacts to the bucket. The S3 secret is in no object of the bucket (Tune's
    pickled run config included), MLflow param, tag or store, Ray log or console line. The
    sweep's best values (a method hyperparameter and a training field) replace the
    configured ones in pretrain.

    The method is SwAV, so the same run also takes a multi-crop method (two global and two
    local crops) with its colour augmentation on the device through the pipeline."""
    import ray
    from mlflow.tracking import MlflowClient

    from cl_core.data.shards import read_manifest
    from pipelines.cli import main
    from pipelines.stages._pretraining import load_method
    from tests.conftest import latest_children, outputs

    work = tmp_path / "work"
    root = f"s3://{BUCKET}/pipeline"
    ray.shutdown()  # a Ray of its own: its workers inherit the S3 server's environment
    try:
        assert (
            main(
                [
                    *(
                        args := [
                            "run",
                            "--work-dir",
                            str(work),
                            "--set",
                            "ray.num_cpus=2",
                            "--set",
                            "pretrain.epochs=1",
                            "--set",
                            "pretrain.batch_size_per_worker=32",
                            "--set",
                            "labels.fractions=[0.1]",
                            "--set",
                            "finetune.baseline=false",
                            "--set",
                            "finetune.epochs=1",
                            "--set",
                            "finetune.min_steps=0",
                            "--set",
                            "finetune.num_workers=1",
                            "--set",
                            "pretrain.method=swav",
                            "--set",
                            "pretrain.views.local_views=2",
                            "--set",
                            "pretrain.params.swav={num_prototypes: 20, freeze_prototypes_steps: 5, hidden_dim: 64}",
                            "--set",
                            "pretrain.views.augment_on=device",
                            "--set",
                            f"data.output={root}/data",
                            "--set",
                            f"ray.storage_path={root}/ray",
                            "--set",
                            f"mlflow.artifact_location={root}/mlflow",
                            "--set",
                            "sweep.enabled=true",
                            "--set",
                            "sweep.space={temperature: {grid: [0.2]}, lr_base: {grid: [0.5]}}",
                            "--set",
                            "sweep.epochs=1",
                        ]
                    ),
                    "--until",
                    "finetune",
                ]
            )
            == 0
        )
        out = capsys.readouterr()
        objects = storage.list_files(root)
        client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
        children = latest_children(client, client.get_experiment_by_name("clpipe").experiment_id)
        # a damaged shard in S3: `--rerun shard` (the fix the reader prints) writes the set again
        shard_dir = outputs(client, children["shard"].info.run_id)["shard_dir"]
        first = read_manifest(shard_dir)["splits"]["train"]["shards"][0]
        storage.write_bytes(f"{shard_dir}/{first['name']}", b"damaged")
        assert main([*args, "--until", "shard", "--rerun", "shard"]) == 0
        assert "cached, reusing run" not in capsys.readouterr().out
        assert hashlib.sha256(storage.read_bytes(f"{shard_dir}/{first['name']}")).hexdigest() == first["sha256"]
        ray_logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
        leaked = _holding(s3.secret_key.encode(), [p for p in ray_logs.rglob("*") if p.is_file()], Path.read_bytes)
        assert not leaked, f"the S3 secret is in Ray's logs: {leaked}"
    finally:
        ray.shutdown()
    # the secret is nowhere in the bucket (shards, Tune's pickled run config, checkpoints, MLflow's artifacts)
    # nor in the MLflow store
    everything = storage.list_files(f"s3://{BUCKET}")
    assert not (leaked := _holding(s3.secret_key.encode(), everything, storage.read_bytes)), leaked
    assert any(o.endswith("tuner.pkl") for o in everything)
    assert s3.secret_key.encode() not in (work / "mlflow.db").read_bytes()
    assert set(children) == {"shard", "labels", "sweep", "pretrain", "finetune"}
    assert any(o.startswith(f"{root}/ray/sweep-") and "/experiment_state-" in o for o in objects)
    assert any(o.startswith(f"{root}/ray/sweep-") and o.endswith("/checkpoint_000000/state.pt") for o in objects)
    shard_dir = outputs(client, children["shard"].info.run_id)["shard_dir"]
    assert shard_dir.startswith(f"{root}/data/shard/") and f"{shard_dir}/manifest.json" in objects
    assert len([o for o in objects if o.startswith(shard_dir) and o.endswith(".tar")]) == 13
    subset = outputs(client, children["labels"].info.run_id)["subsets"]["10pct"]["shard_dir"]
    assert subset.startswith(f"{root}/data/labels/") and f"{subset}/manifest.json" in objects
    assert not list(work.rglob("*.tar")), "shards are not kept in the work dir"
    assert any(o.startswith(f"{root}/ray/pretrain-") and o.endswith("/state.pt") for o in objects)
    assert any(o.startswith(f"{root}/ray/finetune-") and "/models/" in o for o in objects)
    assert any(o.startswith(f"{root}/mlflow/") and o.endswith("/manifest.json") for o in objects)
    pre = children["pretrain"]
    assert pre.info.status == "FINISHED"
    assert pre.info.artifact_uri.startswith(f"{root}/mlflow/")
    encoder = outputs(client, pre.info.run_id)
    assert encoder["checkpoint_dir"].startswith(f"{root}/ray/pretrain-")
    for run in children.values():
        text = repr(run.data.params) + repr(run.data.tags)
        assert s3.secret_key not in text and s3.access_key not in text
    assert s3.secret_key not in out.out + out.err
    # the sweep's best values in pretrain
    assert outputs(client, children["sweep"].info.run_id)["best"] == {"lr_base": 0.5, "temperature": 0.2}
    assert pre.data.params["method.temperature"] == "0.2" and pre.data.params["used.lr_base"] == "0.5"
    assert pre.data.tags["clpipe.sweep_overrides"] == '{"lr_base": 0.5, "temperature": 0.2}'
    # SwAV through the pipeline: its hyperparameters as params, the kNN monitor, the checkpoint (read from S3)
    assert pre.data.params["method.num_prototypes"] == "20" and pre.data.params["views.augment_on"] == "device"
    assert 0 <= pre.data.metrics["val/knn_top1"] <= 1
    assert load_method(encoder).name == "swav"
    assert 0 <= children["finetune"].data.metrics["teacher_10pct/selected_val_top1"] <= 1


def _holding(secret: bytes, places: list, read) -> list:
    """The places (files or objects) whose bytes contain ``secret``."""
    return [p for p in places if secret in read(p)]


def test_image_folder_and_npz_sources_in_s3(s3, tmp_path):
    import io

    import numpy as np

    from cl_core.data.sources import SourceError, encode_png, open_source

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (6, 8, 8, 3), dtype=np.uint8)
    base = f"s3://{BUCKET}/sources/folder"
    for i, img in enumerate(images):
        storage.write_bytes(f"{base}/{'cat' if i % 2 else 'dog'}/{i}.png", encode_png(img))
    storage.write_bytes(f"{base}/notes.txt", b"not an image")
    src = open_source({"kind": "image_folder", "path": base})
    assert src.class_names == ["cat", "dog"] and src.labeled
    refs = src.refs()
    assert [(r.id, r.label) for r in refs] == [
        (f"{c}/{i}.png", ci) for ci, c in enumerate(["cat", "dog"]) for i in range(6) if (i % 2 == 0) == (c == "dog")
    ]
    data, ext = src.encode(refs[0])
    assert ext == "png" and data == encode_png(images[1])
    buf = io.BytesIO()
    np.savez(buf, images=images, labels=np.arange(6) % 3)
    storage.write_bytes(f"s3://{BUCKET}/sources/arrays.npz", buf.getvalue())
    arr = open_source({"kind": "npz", "path": f"s3://{BUCKET}/sources/arrays.npz"})
    assert len(arr.refs()) == 6 and arr.class_names == ["0", "1", "2"]
    with pytest.raises(SourceError, match="holds no images"):
        open_source({"kind": "image_folder", "path": f"s3://{BUCKET}/sources/empty"})
    with pytest.raises(SourceError, match="no such object"):
        open_source({"kind": "npz", "path": f"s3://{BUCKET}/sources/missing.npz"})


def test_an_s3_lease_has_one_holder_and_a_dead_holders_lease_is_taken_over(s3, monkeypatch):
    """The lease object is created with a conditional put (If-None-Match): a second run
    waits (or gives up after wait_s with one line naming the holder); when the holder
    lets go it gets the lease; a lease nobody renews goes stale and is taken over."""
    from pipelines import leases

    root = f"s3://{BUCKET}/leases-test"
    said: list[str] = []
    with leases.lease(root, "pretrain-abc", say=said.append) as waited:
        assert waited is False and storage.exists(f"{root}/{leases.DIR}/pretrain-abc")
        with pytest.raises(leases.LeaseTimeout, match=rf"pretrain-abc: held by another run \(pid {os.getpid()} on "):
            with leases.lease(root, "pretrain-abc", wait_s=1.5, say=said.append):
                pass
        assert said == [said[0]] and "waiting for it to finish" in said[0]
    assert not storage.exists(f"{root}/{leases.DIR}/pretrain-abc")  # let go
    # a holder that died: its lease object stays but is no longer renewed
    storage.write_bytes(f"{root}/{leases.DIR}/pretrain-abc", b'{"host": "gone", "pid": 1, "since": 0}')
    monkeypatch.setattr(leases, "STALE_S", 1.0)
    time.sleep(1.5)
    said.clear()
    with leases.lease(root, "pretrain-abc", wait_s=10, say=said.append):
        assert "taking over a lease not renewed" in said[0] and "pid 1 on gone" in said[0]


def test_an_s3_folder_shard_reads_ahead_and_keeps_order_and_errors(s3, tmp_path, monkeypatch):
    """Shards from an ``s3://`` image folder fetch several objects at once
    (``S3_READS_IN_FLIGHT``) yet come out byte-identical to reading one object at a
    time; an undecodable object is still counted as corrupt at its place; an object gone
    after the listing still fails the shard with the one-line read error naming it."""
    import numpy as np

    from cl_core.data import shards as S
    from cl_core.data import sources
    from cl_core.data.sources import encode_png, open_source

    monkeypatch.setattr(sources, "READ_BACKOFF_S", 0.0)
    rng = np.random.default_rng(1)
    base = f"s3://{BUCKET}/sources/ahead"
    for i in range(40):  # more than the read-ahead window, so it refills
        data = b"not a png" if i == 23 else encode_png(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
        storage.write_bytes(f"{base}/{i:03d}.png", data)
    src = open_source({"kind": "image_folder", "path": base})
    refs = src.refs()
    assert sources.S3_READS_IN_FLIGHT > 1
    ahead = S.write_shard(src, refs, tmp_path / "ahead.tar")
    monkeypatch.setattr(sources, "S3_READS_IN_FLIGHT", 1)
    one = S.write_shard(src, refs, tmp_path / "one.tar")
    assert ahead["sha256"] == one["sha256"] and ahead["num_samples"] == one["num_samples"] == 39
    assert [c["id"] for c in ahead["corrupt"]] == [c["id"] for c in one["corrupt"]] == ["023.png"]
    monkeypatch.setattr(sources, "S3_READS_IN_FLIGHT", 16)
    s3_backend.client().delete_object(Bucket=BUCKET, Key="sources/ahead/031.png")
    with pytest.raises(sources.SourceReadError) as e:
        S.write_shard(src, refs, tmp_path / "gone.tar")
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and f"cannot read {base}/031.png" in msg, msg
    assert not list(tmp_path.glob("gone.tar")) and not list(tmp_path.glob(".gone.tar.*"))
