"""Successive halving for the sweep, decided the same way on every run.

Ray Tune's ``ASHAScheduler`` decides at a rung as each trial reports, against the
trials that happened to report before it; with several trials at a time, which ones
ASHA stops depends on timing, so the same config and seed can pick different
hyperparameters. :class:`SyncHalving` keeps ASHA's rungs (``grace_period`` x
``reduction_factor`` ** k epochs, below ``max_t``) but decides a rung only when every
trial still in the race has reported it: a trial that reaches an undecided rung is
paused (its slot goes to the next trial; it resumes from its epoch checkpoint), and the
decision keeps the best ``1 / reduction_factor`` of them (at least one), ties broken by
the trial's index. The result depends only on the trials' metrics, which are
deterministic given the config and seed.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

if TYPE_CHECKING:
    from ray.tune.execution.tune_controller import TuneController


class SyncHalving(FIFOScheduler):
    _supports_buffered_results = False  # one result at a time: a rung is decided on the result that completes it

    def __init__(
        self,
        *,
        time_attr: str,
        max_t: int,
        grace_period: int,
        reduction_factor: int,
        total_trials: int,
        max_running: int | None = None,
    ) -> None:
        super().__init__()
        self.time_attr, self.sign = time_attr, 1.0  # metric and mode: Tune's (set_search_properties)
        self.reduction_factor, self.total, self.max_running = reduction_factor, total_trials, max_running
        self.rungs: list[int] = []
        r = max(1, grace_period)
        while r < max_t:
            self.rungs.append(r)
            r *= reduction_factor
        self.records: list[dict[str, float]] = [{} for _ in self.rungs]  # per rung: trial id -> metric
        self.promoted: dict[int, set[str]] = {}  # decided rungs: the trial ids that go on
        self.index: dict[str, int] = {}

    def set_search_properties(self, metric: str | None, mode: str | None, **spec) -> bool:
        if metric is None or mode not in ("max", "min"):
            return False
        self._metric, self.sign = metric, 1.0 if mode == "max" else -1.0
        return True

    # ---- bookkeeping ---------------------------------------------------------------

    def _idx(self, trial: Trial) -> int:
        """The trial's index in the experiment (its id's suffix: Tune numbers trials in
        the order the search generates them, and a restored experiment keeps the ids)."""
        tail = trial.trial_id.rsplit("_", 1)[-1]
        return int(tail) if tail.isdigit() else self.index.setdefault(trial.trial_id, len(self.index))

    def _expected(self, controller: TuneController, k: int) -> set[str] | None:
        """The trials that must report rung ``k`` before it is decided; None while the
        search has not generated every trial yet (rung 0) or rung k-1 is undecided."""
        trials = controller.get_trials()
        if k == 0:
            if len(trials) < self.total:
                return None
            race = {t.trial_id for t in trials}
        else:
            if k - 1 not in self.promoted:
                return None
            race = set(self.promoted[k - 1])
        # a trial that ended (an error) without reaching the rung is out of it
        ended = {t.trial_id for t in trials if t.status in (Trial.ERROR, Trial.TERMINATED)}
        return {tid for tid in race if tid in self.records[k] or tid not in ended}

    def _rank_key(self, tid: str, k: int, trials: dict[str, Trial]) -> tuple[float, int]:
        v = self.records[k][tid]
        return (-self.sign * v if not math.isnan(v) else math.inf, self._idx(trials[tid]))

    def _decide(self, controller: TuneController, k: int, current: Trial | None) -> str:
        """Decide rung ``k`` if every trial in the race has reported it: stop the paused
        losers, mark the winners to resume. Returns the action for ``current``."""
        if k in self.promoted:
            return (
                TrialScheduler.CONTINUE
                if current is None or current.trial_id in self.promoted[k]
                else TrialScheduler.STOP
            )
        expected = self._expected(controller, k)
        if expected is None or any(tid not in self.records[k] for tid in expected):
            return TrialScheduler.PAUSE
        trials = {t.trial_id: t for t in controller.get_trials()}
        ranked = sorted(expected, key=lambda tid: self._rank_key(tid, k, trials))
        keep = set(ranked[: max(1, len(ranked) // self.reduction_factor)])
        self.promoted[k] = keep
        for tid in expected - keep:
            t = trials[tid]
            # a trial told to pause stays RUNNING until its checkpoint is saved: it is stopped once paused
            # (choose_trial_to_run), not killed in the middle of the save
            if (current is None or tid != current.trial_id) and t.status == Trial.PAUSED:
                controller.stop_trial(t)
        if current is None:
            return TrialScheduler.CONTINUE
        return TrialScheduler.CONTINUE if current.trial_id in keep else TrialScheduler.STOP

    # ---- Tune's hooks ----------------------------------------------------------------

    def on_trial_result(self, tune_controller: TuneController, trial: Trial, result: dict) -> str:
        t = result.get(self.time_attr)
        if t is None:
            return TrialScheduler.CONTINUE
        for k, milestone in enumerate(self.rungs):
            if t >= milestone and trial.trial_id not in self.records[k]:
                v = result.get(self._metric)
                self.records[k][trial.trial_id] = float(v) if v is not None else math.nan
                return self._decide(tune_controller, k, trial)
        return TrialScheduler.CONTINUE

    def _settle(self, tune_controller: TuneController) -> None:
        """A trial ended: a rung that waited on it may be decidable now."""
        for k in range(len(self.rungs)):
            if k not in self.promoted:
                self._decide(tune_controller, k, None)
                break

    def on_trial_complete(self, tune_controller: TuneController, trial: Trial, result: dict) -> None:
        self._settle(tune_controller)

    def on_trial_error(self, tune_controller: TuneController, trial: Trial) -> None:
        self._settle(tune_controller)

    def on_trial_remove(self, tune_controller: TuneController, trial: Trial) -> None:
        self._settle(tune_controller)

    def _lost(self, trial: Trial) -> bool:
        """Whether a decided rung stopped ``trial``."""
        return any(
            trial.trial_id in self.records[k] and trial.trial_id not in keep for k, keep in self.promoted.items()
        )

    def _may_resume(self, trial: Trial) -> bool:
        """A paused trial resumes once its last recorded rung promoted it (one paused
        before a restore, of which nothing is recorded, resumes as well)."""
        reached = [k for k in range(len(self.rungs)) if trial.trial_id in self.records[k]]
        if not reached:
            return True
        k = reached[-1]
        return k in self.promoted and trial.trial_id in self.promoted[k]

    def choose_trial_to_run(self, tune_controller: TuneController) -> Trial | None:
        trials = tune_controller.get_trials()
        if self.max_running is not None and sum(t.status == Trial.RUNNING for t in trials) >= self.max_running:
            return None
        ordered = sorted(trials, key=self._idx)
        for t in ordered:
            if t.status == Trial.PAUSED and self._lost(t):  # paused while its rung was decided
                tune_controller.stop_trial(t)
        for t in ordered:
            if t.status == Trial.PAUSED and self._may_resume(t):  # finish the race in front first
                return t
        for t in ordered:
            if t.status == Trial.PENDING:
                return t
        return None

    def debug_string(self) -> str:
        decided = ", ".join(f"epoch {self.rungs[k]}: {len(v)} go on" for k, v in sorted(self.promoted.items()))
        return f"SyncHalving: rungs at epochs {self.rungs}; {decided or 'no rung decided yet'}"
