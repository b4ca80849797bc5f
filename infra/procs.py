"""Server processes started by the project (the local stack, test fixtures): each runs
in its own session so it and its children are stopped together, by process-group id,
never by name."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path


def one_line(e: BaseException) -> str:
    """The first line of an error's message (its type name when it has none)."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether ``host:port`` can be bound now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS reports free (for tests; another process may still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def require_free(ports: dict[str, int], host: str = "127.0.0.1") -> None:
    """Raise one line naming the first port in use (``ports``: what -> port)."""
    for what, port in ports.items():
        if not port_free(port, host):
            raise RuntimeError(
                f"{what}: port {host}:{port} is already in use; stop what holds it or choose another port"
            )


def spawn(cmd: Sequence[str], log: Path, env: Mapping[str, str | None] | None = None, cwd: Path | None = None) -> int:
    """Start ``cmd`` in a new session, stdout and stderr to ``log``; return its pid (also its
    process-group id). ``env`` adds to this process's environment; a None value removes the
    variable."""
    log.parent.mkdir(parents=True, exist_ok=True)
    full = {**os.environ, **(env or {})}
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            list(cmd),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={k: v for k, v in full.items() if v is not None},
            cwd=cwd,
            start_new_session=True,
        )
    return proc.pid


def children_by_parent() -> dict[int, list[int]]:
    """Every live process's pid under its parent's pid (from /proc; a process that exits
    while it is read is left out)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])  # "pid (comm) state ppid": comm may hold spaces
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    return children


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not reaped yet) is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def stop(pid: int, timeout: float = 15.0) -> None:
    """SIGTERM the process group ``pid`` started, SIGKILL it after ``timeout`` seconds."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:  # reap it if it is our child
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            if not alive(pid):
                return
            time.sleep(0.1)


def wait_until(
    check: Callable[[], bool], timeout: float, what: str, pid: int | None = None, log: Path | None = None
) -> None:
    """Poll ``check`` until true; raise one line naming ``what`` (and the log) after
    ``timeout`` seconds or as soon as ``pid`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if pid is not None and not alive(pid):
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log and log.exists() else []
            raise RuntimeError(
                f"{what} exited while starting{f': {tail[0]}' if tail else ''}{f' (log {log})' if log else ''}"
            )
        time.sleep(0.25)
    raise RuntimeError(f"{what} did not become healthy within {timeout:g} s{f' (log {log})' if log else ''}")


def http_ok(url: str, timeout: float = 2.0, headers: dict[str, str] | None = None) -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as r:
            return 200 <= r.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def node_sees(paths: list[str]) -> tuple[str, list[bool]]:
    """(this host's IP as Ray knows it, whether each path exists here): run as a Ray task
    pinned to a node, it tells whether that node shares the caller's filesystem."""
    import ray

    return ray.util.get_node_ip_address(), [os.path.exists(p) for p in paths]
