"""Leases: one holder at a time for a named piece of work that several runs may share.

Two runs whose stage has the same cache key would write the same output dir, shard set
and Ray run (one could delete or resume from the other's checkpoints); two register
stages could both read the champion before either sets it. A lease makes the second one
wait until the first is done, then look again (the first one's result is usually what it
needed).

Where a lease lives follows where the shared outputs live:

- ``ray.storage_path`` in S3: an object ``<storage>/.clpipe-leases/<name>`` created with a
  conditional put (``If-None-Match: *``: only one creator wins, on any host), rewritten
  by its holder every :data:`HEARTBEAT_S` seconds; a lease not rewritten for
  :data:`STALE_S` seconds belongs to a run that died and is taken over;
- otherwise: an exclusive ``fcntl`` lock on ``<work_dir>/.clpipe-leases/<name>.lock``
  (a local disk, or a shared POSIX path: NFS locks it across hosts), which the kernel
  drops when the holder dies.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cl_core.data import storage
from infra import s3

DIR = ".clpipe-leases"
HEARTBEAT_S = 10.0
STALE_S = 60.0
POLL_S = 1.0


class LeaseTimeout(TimeoutError):
    """The lease stayed held by another run for longer than the caller would wait."""


def _holder() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}


def _describe(holder: dict[str, Any]) -> str:
    since = time.strftime("%H:%M:%S", time.localtime(holder.get("since", 0)))
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {since}"


@contextmanager
def lease(root: str, name: str, *, wait_s: float | None = None, say: Callable[[str], None] = print) -> Iterator[bool]:
    """Hold the lease ``name`` under ``root`` (an ``s3://`` prefix or a directory) for
    the ``with`` block. Yields whether it had to wait for another holder first. A lease
    held elsewhere for longer than ``wait_s`` seconds (None: no limit) raises
    :class:`LeaseTimeout` with one line naming the holder."""
    if storage.is_s3(root):
        with _s3_lease(storage.join(root, DIR, name), name, wait_s, say) as waited:
            yield waited
    else:
        with _file_lease(Path(root) / DIR / f"{name}.lock", name, wait_s, say) as waited:
            yield waited


@contextmanager
def _file_lease(path: Path, name: str, wait_s: float | None, say: Callable[[str], None]) -> Iterator[bool]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    waited = False
    try:
        deadline = None if wait_s is None else time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _read_json(path.read_bytes)
                if not waited:
                    say(f"{name}: another run holds it ({_describe(holder)}); waiting for it to finish")
                    waited = True
                if deadline is not None and time.monotonic() > deadline:
                    raise LeaseTimeout(
                        f"{name}: held by another run ({_describe(holder)}) for over {wait_s:g} s; "
                        f"wait for it, or stop it ({path})"
                    ) from None
                time.sleep(POLL_S)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder()).encode(), 0)
        yield waited
    finally:
        os.close(fd)  # drops the lock


def _read_json(read: Callable[[], bytes]) -> dict[str, Any]:
    try:
        return json.loads(read() or b"{}")
    except (OSError, ValueError):
        return {}


@contextmanager
def _s3_lease(uri: str, name: str, wait_s: float | None, say: Callable[[str], None]) -> Iterator[bool]:
    from botocore.exceptions import ClientError

    bucket, key = s3.split_s3(uri)
    client = s3.client()
    me = {**_holder(), "token": os.urandom(8).hex()}
    waited = False
    deadline = None if wait_s is None else time.monotonic() + wait_s
    while True:
        try:
            client.put_object(Bucket=bucket, Key=key, Body=json.dumps(me).encode(), IfNoneMatch="*")
            break
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code not in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                raise s3.explain(uri, e) from None
        try:
            head = client.head_object(Bucket=bucket, Key=key)
        except ClientError:
            continue  # released meanwhile: try again
        holder = _read_json(lambda: storage.read_bytes(uri))
        age = time.time() - head["LastModified"].timestamp()
        if age > STALE_S:  # its holder stopped rewriting it: a run that died
            say(f"{name}: taking over a lease not renewed for {age:.0f} s ({_describe(holder)})")
            client.delete_object(Bucket=bucket, Key=key)
            continue
        if not waited:
            say(f"{name}: another run holds it ({_describe(holder)}); waiting for it to finish")
            waited = True
        if deadline is not None and time.monotonic() > deadline:
            raise LeaseTimeout(
                f"{name}: held by another run ({_describe(holder)}) for over {wait_s:g} s; wait for "
                f"it, or stop it ({uri})"
            )
        time.sleep(POLL_S)
    stop = threading.Event()

    def renew() -> None:  # the holder's heartbeat: a lease that is rewritten is not stale
        while not stop.wait(HEARTBEAT_S):
            try:
                client.put_object(Bucket=bucket, Key=key, Body=json.dumps(me).encode())
            except Exception:  # a missed beat; the next one may get through
                pass

    beat = threading.Thread(target=renew, name=f"lease {name}", daemon=True)
    beat.start()
    try:
        yield waited
    finally:
        stop.set()
        beat.join(timeout=HEARTBEAT_S)
        try:
            if _read_json(lambda: storage.read_bytes(uri)).get("token") == me["token"]:
                client.delete_object(Bucket=bucket, Key=key)
        except Exception:  # gone already, or storage down: it goes stale and is taken over
            pass


def root_for(cfg: Any) -> str:
    """Where ``cfg``'s leases live: with Ray's run storage when that is S3, else in the
    work dir."""
    if cfg.ray.storage_path and storage.is_s3(cfg.ray.storage_path):
        return str(cfg.ray.storage_path)
    return str(cfg.work_path())
