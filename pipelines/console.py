"""The one rich console the CLI and stages print to, and the time-left estimate of their
progress lines."""

from __future__ import annotations

import time

from rich.console import Console

console = Console(highlight=False, soft_wrap=True)  # paths and commands stay copyable


def duration(seconds: float) -> str:
    """``42 s``, ``3m05s``, ``1h02m``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Eta:
    """Progress of a loop of ``total`` units (epochs): the share done, the time spent and the
    time left at the rate of the units done since this object was made (a resumed loop's
    earlier units count as done, not in the rate)."""

    def __init__(self, total: int, done: int = 0) -> None:
        self.total, self.first, self.t0 = max(1, total), done, time.monotonic()

    def __call__(self, done: int) -> str:
        spent = time.monotonic() - self.t0
        if done >= self.total:
            return f"[{done}/{self.total}, {duration(spent)}]"
        if done <= self.first:
            return f"[{done}/{self.total}]"
        left = spent / (done - self.first) * (self.total - done)
        return f"[{done}/{self.total} {100 * done // self.total}%, {duration(spent)}, eta {duration(left)}]"
