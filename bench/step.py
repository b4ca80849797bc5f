"""SimCLR training-step throughput: this project against lightly, side by side.

Both sides train the same torchvision backbone (built by ``cl_core.models.build_backbone``,
same initial weights) with the same batch, resolution, optimizer (SGD, momentum 0.9) and
device, on the same pre-made views (no data loading: the step alone).

- ``clpipe``: ``cl_core.methods.SimCLR`` (one backbone pass over both views, the
  project's SimCLR head and NT-Xent), with the training loop's device settings
  (:func:`cl_core.engine.device_settings`: bf16 autocast and channels_last on CUDA).
- ``lightly``: lightly's ``SimCLRProjectionHead`` + ``NTXentLoss`` on the same backbone,
  one pass per view as in lightly's SimCLR example, fp32 as the example runs it.
- ``clpipe-bf16`` / ``lightly-bf16``: both under the same bf16 autocast (on CUDA the
  project's default already is bf16; on CPU it is ``precision: bf16``), so the
  same-precision ratio shows what is not precision.

Each side runs in its own process: the project's as its training loop runs it (on a CPU
with ``cpu_allocator: cache``, :mod:`cl_core.allocator`), lightly's as a plain script
runs (glibc's default allocator). In one process the sides would share a heap, and
whichever ran first would decide how much the next one page-faults.
``bench/allocator.py`` gives each side each allocator. With ``--compile`` both sides
also run with ``torch.compile``'d backbones.

The sides alternate, several repetitions of a fixed number of steps each; the result is
the median images/s (an image = its two views) per side and their ratio. On CUDA the
achieved model FLOP/s (forward + backward, counted once by ``torch.utils.flop_counter``)
is given against the device's dense bf16 peak (MFU).

    .venv/bin/pip install -c constraints.txt -r bench/requirements.txt   # lightly, for this script only
    .venv/bin/python bench/step.py                       # the configs for this machine's device
    .venv/bin/python bench/step.py --configs small_cnn-32 --reps 3

Writes ``bench/results/step-<device>.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.methods import machine  # noqa: E402
from cl_core import allocator  # noqa: E402
from cl_core.engine import compile_networks, device_settings  # noqa: E402
from cl_core.methods import SimCLR  # noqa: E402
from cl_core.models import build_backbone  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# name: (backbone, backbone args, image size, batch per step)
CONFIGS = {
    "small_cnn-32": ("small_cnn", {"width": 32}, 32, 256),
    "resnet18-32": ("resnet18", {"cifar_stem": True}, 32, 128),
    "resnet18-32-gpu": ("resnet18", {"cifar_stem": True}, 32, 512),
    "resnet50-224": ("resnet50", {}, 224, 128),
}
CPU_CONFIGS = ["small_cnn-32", "resnet18-32"]
GPU_CONFIGS = ["resnet18-32-gpu", "resnet50-224"]
# dense bf16 tensor-core peaks (no sparsity), FLOP/s
PEAKS = {
    "H100 SXM": 989e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H200": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "A10G": 70e12,
}
TEMPERATURE, PROJ_DIM = 0.5, 128


def peak_flops(name: str | None) -> float | None:
    if not name:
        return None
    for key, value in PEAKS.items():
        if all(part in name for part in key.split()):
            return value
    return None


class ProjectSide:
    """The project's SimCLR step, with the training loop's device settings."""

    def __init__(
        self, backbone: str, args: dict, device: torch.device, bf16: bool | None = None, compile: bool = False
    ) -> None:
        torch.manual_seed(0)
        self.model = SimCLR(
            backbone, backbone_args=args, temperature=TEMPERATURE, proj_dim=PROJ_DIM, gather_distributed=False
        )
        self.settings = device_settings(device, bf16=bf16)
        self.model = self.settings.prepare(self.model.to(device))
        if compile:  # what the loop does with ``compile: true``
            compile_networks(self.model)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)
        self.device = device

    def step(self, x0: torch.Tensor, x1: torch.Tensor) -> float:
        views = [self.settings.input(x0), self.settings.input(x1)]
        with self.settings.autocast():
            loss = self.model(views).loss
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach()


class LightlySide:
    """lightly's SimCLR: its projection head and NT-Xent on the same backbone, one
    forward pass per view (lightly's example)."""

    def __init__(
        self, backbone: str, args: dict, device: torch.device, bf16: bool | None = False, compile: bool = False
    ) -> None:
        from lightly.loss import NTXentLoss
        from lightly.models.modules import SimCLRProjectionHead

        torch.manual_seed(0)
        self.backbone, feat = build_backbone(backbone, **args)
        self.head = SimCLRProjectionHead(feat, feat, PROJ_DIM)
        self.model = nn.ModuleDict({"backbone": self.backbone, "head": self.head}).to(device)
        if compile:
            self.backbone.compile()
        self.criterion = NTXentLoss(temperature=TEMPERATURE)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)
        self.autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(bf16))

    def step(self, x0: torch.Tensor, x1: torch.Tensor) -> float:
        with self.autocast():
            z0 = self.head(self.backbone(x0))
            z1 = self.head(self.backbone(x1))
            loss = self.criterion(z0.float(), z1.float())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(step: Callable, x0: torch.Tensor, x1: torch.Tensor, steps: int, device: torch.device) -> float:
    if steps == 0:
        return 0.0
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step(x0, x1)
    float(loss)  # wait for the last step
    sync(device)
    return time.perf_counter() - t0


def step_flops(side: ProjectSide, x0: torch.Tensor, x1: torch.Tensor) -> float:
    """FLOPs of one training step (forward + backward), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        side.step(x0, x1)
    return float(counter.get_total_flops())


class SideProcess:
    """One side in its own process (spawned), so no side inherits another's heap or
    allocator state; the parent asks the sides in turn to time ``steps`` steps."""

    def __init__(
        self,
        kind: str,
        config: str,
        device: torch.device,
        *,
        bf16: bool | None = None,
        compile: bool = False,
        alloc: str = "cache",
    ) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=_serve,
            args=(child, kind, config, str(device), bf16, compile, alloc, torch.get_num_threads()),
            daemon=True,
        )
        self.proc.start()

    def ask(self, request):
        self.conn.send(request)
        reply = self.conn.recv()
        if isinstance(reply, BaseException):
            raise reply
        return reply

    def close(self) -> float:
        """Stops the process; returns its peak resident memory in MiB."""
        rss = self.ask(None)
        self.proc.join()
        return rss


def _serve(
    conn, kind: str, config: str, device_name: str, bf16: bool | None, compile: bool, alloc: str, threads: int
) -> None:
    torch.set_num_threads(threads)
    allocator.cache_freed_memory(alloc == "cache")
    device = torch.device(device_name)
    backbone, args, size, batch = CONFIGS[config]
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(batch, 3, size, size, generator=gen).to(device)
    x1 = torch.rand(batch, 3, size, size, generator=gen).to(device)
    side = (ProjectSide if kind == "clpipe" else LightlySide)(backbone, args, device, bf16=bf16, compile=compile)
    while True:
        request = conn.recv()
        try:
            if request is None:
                conn.send(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
                return
            conn.send(step_flops(side, x0, x1) if request == "flops" else timed(side.step, x0, x1, request, device))
        except Exception as e:  # noqa: BLE001 - handed to the parent, which raises it
            conn.send(e)


def run_config(name: str, device: torch.device, reps: int, steps: int, warmup: int, compile: bool = False) -> dict:
    """The project's sides run as the training loop would (on a CPU: its ``cpu_allocator:
    cache``), lightly's as a plain script runs (glibc's allocator); ``bench/allocator.py``
    gives both sides each allocator."""
    backbone, args, _size, batch = CONFIGS[name]
    cuda = device.type == "cuda"
    specs = {
        "clpipe": ("clpipe", None, False),
        "lightly": ("lightly", False, False),
        "clpipe-bf16": ("clpipe", True, False),
        "lightly-bf16": ("lightly", True, False),
    }
    if compile:  # the backbones under torch.compile, default precision of the device
        specs |= {"clpipe-compile": ("clpipe", None, True), "lightly-compile": ("lightly", cuda, True)}
    sides = {
        k: SideProcess(kind, name, device, bf16=bf16, compile=comp, alloc="cache" if kind == "clpipe" else "system")
        for k, (kind, bf16, comp) in specs.items()
    }
    for side in sides.values():  # warm-up (and compilation), one side at a time
        side.ask(warmup)
    seconds: dict[str, list[float]] = {k: [] for k in sides}
    for r in range(reps):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))  # alternate the order
        for k in order:
            seconds[k].append(sides[k].ask(steps))
    flops = sides["clpipe"].ask("flops") if cuda else None
    rss = {k: side.close() for k, side in sides.items()}
    rates = {k: [batch * steps / s for s in v] for k, v in seconds.items()}
    med = {k: statistics.median(v) for k, v in rates.items()}
    out = {
        "config": name,
        "backbone": backbone,
        "backbone_args": args,
        "image_size": CONFIGS[name][2],
        "batch": batch,
        "steps_per_rep": steps,
        "reps": reps,
        "images_per_sec": rates,
        "median_images_per_sec": med,
        "peak_rss_mib": rss,
        "ratio": med["clpipe"] / med["lightly"],
        "ratio_same_precision": {
            "fp32" if not cuda else "bf16": (med["clpipe"] / med["lightly"])
            if not cuda
            else med["clpipe"] / med["lightly-bf16"],
            "bf16": med["clpipe-bf16"] / med["lightly-bf16"],
        },
    }
    if compile:
        out |= {
            "ratio_compiled": med["clpipe-compile"] / med["lightly-compile"],
            "compile_speedup": med["clpipe-compile"] / med["clpipe"],
        }
    if flops is not None:
        peak = peak_flops(torch.cuda.get_device_name(0))
        achieved = flops * med["clpipe"] / batch
        out |= {
            "step_flops": flops,
            "achieved_flops_per_sec": achieved,
            "peak_bf16_flops_per_sec": peak,
            "mfu": achieved / peak if peak else None,
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="*", choices=sorted(CONFIGS))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=0, help="steps per repetition (0: 5 on CPU, 20 on CUDA)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--compile", action="store_true", help="also time both sides with torch.compile'd backbones")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    configs = args.configs or (GPU_CONFIGS if device.type == "cuda" else CPU_CONFIGS)
    steps = args.steps or (20 if device.type == "cuda" else 5)
    results = [run_config(c, device, args.reps, steps, args.warmup, args.compile) for c in configs]
    report = {
        "benchmark": "simclr-step",
        "device": device.type,
        "machine": machine() | {"torch_threads": torch.get_num_threads()},
        "results": results,
    }
    out = args.out or RESULTS / f"step-{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    cuda = device.type == "cuda"
    print(
        "| config | batch | clpipe | lightly | ratio | clpipe bf16 | lightly bf16 | bf16 ratio |"
        + (" MFU |" if cuda else "")
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if cuda else ""))
    for r in results:
        med = r["median_images_per_sec"]
        mfu = f" {r['mfu']:.1%} |" if r.get("mfu") is not None else (" n/a |" if cuda else "")
        print(
            f"| {r['config']} | {r['batch']} | {med['clpipe']:.0f} | {med['lightly']:.0f} | {r['ratio']:.2f}x | "
            f"{med['clpipe-bf16']:.0f} | {med['lightly-bf16']:.0f} | {r['ratio_same_precision']['bf16']:.2f}x |{mfu}"
        )
    if args.compile:
        print("\n| config | clpipe compiled | lightly compiled | ratio | compile speed-up (clpipe) |")
        print("|---|---:|---:|---:|---:|")
        for r in results:
            med = r["median_images_per_sec"]
            print(
                f"| {r['config']} | {med['clpipe-compile']:.0f} | {med['lightly-compile']:.0f} | "
                f"{r['ratio_compiled']:.2f}x | {r['compile_speedup']:.2f}x |"
            )
    print("images/s (an image = two views), medians over the repetitions")
    print(f"results: {out}")


if __name__ == "__main__":
    main()
