"""The callback registry, and the step-time watchdog as the example of an optional callback."""

import pytest

from lws_megatron.config import load_config
from lws_megatron.errors import UserError
from lws_megatron.training.callbacks import build_callbacks
from lws_megatron.training.callbacks.watchdog import StepTimeWatchdog
from lws_megatron.training.step_stats import Interval
from tests.helpers import TINY

DEFAULTS = ["speed_monitor", "evaluation", "nonfinite_stop", "preemption", "checkpointing"]


class FakeTrainer:
    def __init__(self):
        self.step, self.lines = 0, []

    def say(self, line):
        self.lines.append(line)


def _names(callbacks) -> list[str]:
    return [type(cb).__name__ for cb in callbacks]


def test_defaults_always_run_and_checkpointing_comes_last():
    names = _names(build_callbacks([]))
    assert len(names) == len(DEFAULTS) and "StepTimeWatchdog" not in names
    assert names[-1] == "Checkpointing" and names[0] == "SpeedMonitor"


def test_one_line_of_config_adds_the_watchdog():
    config = load_config(TINY, ["train.callbacks=[step_time_watchdog]"])
    assert "StepTimeWatchdog" in _names(build_callbacks(config.train.callbacks))


def test_an_unknown_callback_is_refused_naming_the_available_ones():
    with pytest.raises(
        UserError, match="unknown callback 'watchdgo'; available: step_time_watchdog"
    ):
        build_callbacks(["watchdgo"])


def _interval(step_seconds: float, steps: int = 1, forward=()) -> Interval:
    return Interval(
        steps=steps,
        seconds=step_seconds * steps,
        skipped=0,
        nonfinite_run=0,
        metrics={"loss": 1.0, "grad_norm": 1.0},
        rank_forward_s=tuple(f * steps for f in forward),
    )


def test_watchdog_warns_about_a_step_three_times_the_median():
    watchdog, trainer = StepTimeWatchdog(), FakeTrainer()
    for trainer.step, seconds in enumerate([0.1] * 10 + [0.29, 0.35, 0.1], start=1):
        watchdog.on_interval_end(trainer, _interval(seconds))
    assert watchdog.slow_intervals == 1
    (line,) = trainer.lines
    assert line.startswith("warning: step 12 took 0.350 s per step, 3.5x the median 0.100 s")


def test_watchdog_judges_intervals_by_their_mean_step_time():
    watchdog, trainer = StepTimeWatchdog(), FakeTrainer()
    for k, seconds in enumerate([0.1] * 6 + [0.4], start=1):
        trainer.step = 10 * k
        watchdog.on_interval_end(trainer, _interval(seconds, steps=10))
    (line,) = trainer.lines
    assert line.startswith("warning: steps 61-70 took 0.400 s per step, 4.0x the median")


def test_watchdog_judges_nothing_during_warm_up():
    watchdog, trainer = StepTimeWatchdog(), FakeTrainer()
    for seconds in (0.1, 5.0, 0.1, 9.0):  # compiles and caches in the first steps
        watchdog.on_interval_end(trainer, _interval(seconds))
    assert trainer.lines == [] and watchdog.slow_intervals == 0


def test_watchdog_names_the_slowest_rank_and_by_how_much():
    watchdog, trainer = StepTimeWatchdog(), FakeTrainer()
    for trainer.step in range(1, 8):
        ranks = (0.1, 0.1, 0.1, 0.1) if trainer.step < 7 else (0.1, 0.1, 0.2, 0.1)
        watchdog.on_interval_end(trainer, _interval(0.2, steps=2, forward=ranks))
    (line,) = trainer.lines
    assert line == (
        "warning: steps 6-7: rank 2 is the slowest, forward 0.200 s per step, 2.00x the "
        "median rank's 0.100 s"
    )
    assert watchdog.stragglers == 1 and watchdog.slow_intervals == 0
