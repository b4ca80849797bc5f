"""The sweep's successive halving (pipelines/halving.py) against Tune's scheduler
interface, with a stand-in for Tune's controller: the same metrics give the same
decisions in whatever order the trials report, paused losers (paused or still saving
their checkpoint) are stopped, winners resume, and the race never stalls."""

import itertools
import random

import pytest
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

from pipelines.halving import SyncHalving


class FakeTrial:
    def __init__(self, i: int) -> None:
        self.trial_id, self.status, self.is_saving, self.epoch = f"abc_{i:05d}", Trial.PENDING, False, 0


class FakeController:
    """What SyncHalving uses of Tune's controller: the trials, and stop_trial."""

    def __init__(self, trials: list[FakeTrial], scheduler: SyncHalving) -> None:
        self.trials, self.scheduler = trials, scheduler

    def get_trials(self) -> list[FakeTrial]:
        return list(self.trials)

    def stop_trial(self, t: FakeTrial) -> None:
        t.status, t.is_saving = Trial.TERMINATED, False
        self.scheduler.on_trial_remove(self, t)


def race(values: dict[int, list[float]], max_t: int, slots: int, rng: random.Random, pause_lag: bool) -> dict:
    """Run the trials to the end, ``slots`` at a time, the next report taken from a random
    running trial; with ``pause_lag`` a paused trial stays RUNNING and saving for a while."""
    sched = SyncHalving(time_attr="epoch", max_t=max_t, grace_period=1, reduction_factor=2, total_trials=len(values))
    assert sched.set_search_properties("val", "max")
    trials = [FakeTrial(i) for i in values]
    ctl = FakeController(trials, sched)
    for t in trials:
        sched.on_trial_add(ctl, t)
    saving: list[FakeTrial] = []
    for _ in range(1000):
        while sum(t.status == Trial.RUNNING for t in trials) < slots:
            nxt = sched.choose_trial_to_run(ctl)
            if nxt is None:
                break
            nxt.status = Trial.RUNNING
        running = [t for t in trials if t.status == Trial.RUNNING and not t.is_saving]
        if not running and not saving:
            break
        if saving and (not running or rng.random() < 0.5):  # a pause completes
            t = saving.pop(rng.randrange(len(saving)))
            if t.status == Trial.RUNNING:
                t.status, t.is_saving = Trial.PAUSED, False
            continue
        t = rng.choice(running)
        t.epoch += 1
        action = sched.on_trial_result(ctl, t, {"epoch": t.epoch, "val": values[int(t.trial_id[-5:])][t.epoch - 1]})
        if action == TrialScheduler.STOP or (action == TrialScheduler.CONTINUE and t.epoch == max_t):
            t.status = Trial.TERMINATED
            sched.on_trial_complete(ctl, t, {})
        elif action == TrialScheduler.PAUSE:
            if pause_lag:
                t.is_saving = True
                saving.append(t)
            else:
                t.status = Trial.PAUSED
    else:
        raise AssertionError("the race did not end")
    assert all(t.status == Trial.TERMINATED for t in trials), [(t.trial_id, t.status) for t in trials]
    return {"epochs": {t.trial_id: t.epoch for t in trials}, "promoted": sched.promoted}


@pytest.mark.parametrize("slots,pause_lag", list(itertools.product([1, 2, 3], [False, True])))
def test_the_same_metrics_give_the_same_decisions_in_any_report_order(slots, pause_lag):
    # 6 trials, 4 epochs: rungs at 1 and 2; trial 4 leads at rung 1 but fades; 1 and 2 tie at rung 1
    values = {
        0: [0.5, 0.6, 0.7, 0.8],
        1: [0.6, 0.7, 0.75, 0.8],
        2: [0.6, 0.65, 0.7, 0.7],
        3: [0.1, 0.9, 0.9, 0.9],
        4: [0.7, 0.5, 0.5, 0.5],
        5: [float("nan")] * 4,
    }
    first = race(values, 4, slots, random.Random(0), pause_lag)
    for seed in range(1, 12):
        assert race(values, 4, slots, random.Random(seed), pause_lag) == first
    e = first["epochs"]
    # rung 1: the best 3 of 6 go on (4, then the tie 1 and 2 by index; NaN last); rung 2: the best 1 of 3
    assert [e[f"abc_{i:05d}"] for i in range(6)] == [1, 4, 2, 1, 2, 1]
