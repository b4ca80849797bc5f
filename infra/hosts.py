"""Separate hosts on this one machine, for tests and benchmarks of a real multi-host cluster.

Each host is a network namespace (its own interfaces, loopback and port space) holding a
mount namespace of its own in which ``/tmp``, ``/dev/shm`` and the directories a test
names are private tmpfs mounts: what one host writes there the other cannot see, as on
two machines. The hosts reach each other over a veth pair with addresses the test
chooses. Everything else of the file system (this checkout, its virtualenv, the
interpreter) is seen by both, as an image baked into every node of a cluster is; a
directory outside the private ones plays an NFS share mounted on both.

A host is entered with ``nsenter`` through a long-lived anchor process; at the end every
process in its network namespace is stopped by pid (``ip netns pids``) and the
namespaces are deleted.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from infra import procs

HOME = "/tmp/home"  # each host's home: inside its private /tmp


@dataclass
class Host:
    netns: str
    ip: str
    anchor: int  # the process whose namespaces the host's commands enter

    def argv(self, cmd: Sequence[str]) -> list[str]:
        return ["nsenter", f"--target={self.anchor}", "--net", "--mount", "--", *cmd]

    def env(self, extra: Mapping[str, str | None] | None = None) -> dict[str, str]:
        """This process's environment less Ray's and the AWS/MLflow settings of this
        machine, with the host's own home, plus ``extra``."""
        drop = ("RAY_", "AWS_", "MLFLOW_", "CLPIPE_")
        env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
        env["HOME"] = HOME
        for k, v in (extra or {}).items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v
        return env

    def run(
        self,
        cmd: Sequence[str],
        env: Mapping[str, str | None] | None = None,
        timeout: float = 120,
        cwd: Path | None = None,
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            self.argv(cmd), env=self.env(env), capture_output=True, text=True, timeout=timeout, cwd=cwd
        )

    def spawn(
        self, cmd: Sequence[str], log: Path, env: Mapping[str, str | None] | None = None, cwd: Path | None = None
    ) -> int:
        """Start ``cmd`` on the host in a session of its own (output to ``log``, a path of
        this machine); returns its pid."""
        with open(log, "ab") as out:
            p = subprocess.Popen(
                self.argv(cmd), stdout=out, stderr=subprocess.STDOUT, env=self.env(env), cwd=cwd, start_new_session=True
            )
        return p.pid

    def popen(
        self, cmd: Sequence[str], env: Mapping[str, str | None] | None = None, cwd: Path | None = None
    ) -> subprocess.Popen:
        """``cmd`` on the host with its output (stdout and stderr) to read as text lines."""
        return subprocess.Popen(
            self.argv(cmd),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self.env(env),
            cwd=cwd,
            start_new_session=True,
        )

    def join_ray(self, head_ip: str, stack_env: dict[str, str], log: Path, num_cpus: int = 2) -> int:
        """Start a Ray worker node here (this virtualenv's ``ray start --block``) that joins
        the head at ``head_ip``:6379 with the token of ``stack_env`` (a stack's env file
        with ``--ray-auth token``) and that stack's S3 keys as the node's own credentials,
        as an instance role gives them; Ray's metrics off, as on the stack's head. Returns
        its pid; output to ``log``."""
        from infra.stack import METRICS_ENV

        bin_dir = Path(sys.executable).parent
        env = {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": stack_env["RAY_AUTH_TOKEN"],
            **dict.fromkeys(METRICS_ENV, "0"),
            "AWS_ACCESS_KEY_ID": stack_env["AWS_ACCESS_KEY_ID"],
            "AWS_SECRET_ACCESS_KEY": stack_env["AWS_SECRET_ACCESS_KEY"],
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        }
        return self.spawn(
            [
                str(bin_dir / "ray"),
                "start",
                f"--address={head_ip}:6379",
                f"--node-ip-address={self.ip}",
                f"--num-cpus={num_cpus}",
                "--disable-usage-stats",
                "--block",
            ],
            log,
            env=env,
        )

    def file(self, path: str | Path) -> Path:
        """``path`` as this host sees it (its private mounts included), read from here."""
        return Path(f"/proc/{self.anchor}/root") / Path(path).relative_to("/")

    def pids(self) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]


def unavailable() -> str | None:
    """Why hosts cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network and mount namespaces need root"
    for tool in ("ip", "nsenter", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    for what, path in (("the Python interpreter", sys.executable), ("the project", str(Path(__file__).parents[1]))):
        if any(path == m or path.startswith(m + "/") for m in ("/tmp", "/dev/shm")):
            return f"{what} is at {path}, but each host gets a private /tmp and /dev/shm: use a checkout outside them"
    name = f"clpprobe{secrets.token_hex(3)}"
    r = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if r.returncode != 0:
        return f"ip netns add failed: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")


def _anchor(netns: str, private: Sequence[Path]) -> int:
    """A process in ``netns`` with a private mount namespace: tmpfs over /tmp, /dev/shm
    and each of ``private``."""
    mounts = ["/tmp", "/dev/shm", *map(str, private)]
    script = " && ".join(
        [
            *(f"mount -t tmpfs -o mode=0755 tmpfs {m}" for m in mounts),
            f"mkdir -p {HOME}",
            "echo ready",
            "exec sleep 86400",
        ]
    )
    p = subprocess.Popen(
        ["ip", "netns", "exec", netns, "unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    assert p.stdout is not None
    line = p.stdout.readline().strip()
    if line != "ready":
        p.kill()
        raise RuntimeError(f"host {netns}: the private mounts failed: {line} {p.stdout.read()}")
    return p.pid


def _stop_host(host: Host, grace_s: float = 3.0) -> None:
    """SIGTERM every process in the host's network namespace, SIGKILL what is left after
    ``grace_s`` seconds, the anchor last (its private mounts go with it)."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        pids = [p for p in host.pids() if p != host.anchor]
        for p in pids:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while pids and time.monotonic() < deadline:
            for p in pids:
                try:
                    os.waitpid(p, os.WNOHANG)
                except ChildProcessError:
                    pass
            pids = [p for p in pids if procs.alive(p)]
            time.sleep(0.1)
    try:
        os.kill(host.anchor, signal.SIGKILL)
        os.waitpid(host.anchor, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


@contextmanager
def two_hosts(private: Sequence[Path] = ()) -> Iterator[tuple[Host, Host]]:
    """Hosts A (10.R.R.1) and B (10.R.R.2) joined by a veth pair, each with private
    /tmp, /dev/shm and ``private`` directories; all removed afterwards."""
    tag = secrets.token_hex(3)
    a_ns, b_ns = f"clp{tag}a", f"clp{tag}b"
    net = f"10.{secrets.randbelow(200) + 20}.{secrets.randbelow(250) + 1}"
    hosts: list[Host] = []
    made: list[str] = []
    try:
        for ns in (a_ns, b_ns):
            _ip("netns", "add", ns)
            made.append(ns)
        _ip("link", "add", f"v{tag}a", "type", "veth", "peer", "name", f"v{tag}b")
        for ns, side, last in ((a_ns, "a", 1), (b_ns, "b", 2)):
            _ip("link", "set", f"v{tag}{side}", "netns", ns)
            _ip("-n", ns, "addr", "add", f"{net}.{last}/24", "dev", f"v{tag}{side}")
            _ip("-n", ns, "link", "set", f"v{tag}{side}", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            hosts.append(Host(ns, f"{net}.{last}", _anchor(ns, private)))
        yield hosts[0], hosts[1]
    finally:
        for h in hosts:
            _stop_host(h)
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
