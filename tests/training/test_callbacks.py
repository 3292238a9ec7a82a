"""The callback registry, and the step-time watchdog as the example of an optional callback."""

from pathlib import Path

import pytest

from lws_megatron.config import load_config
from lws_megatron.errors import UserError
from lws_megatron.training.callbacks import build_callbacks
from lws_megatron.training.callbacks.watchdog import StepTimeWatchdog
from lws_megatron.training.train_module import StepResult

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
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


def test_watchdog_warns_about_a_step_three_times_the_median():
    watchdog, trainer = StepTimeWatchdog(), FakeTrainer()
    result = StepResult(loss=1.0, grad_norm=1.0, skipped=False)
    for trainer.step, seconds in enumerate([0.1] * 10 + [0.29, 0.35, 0.1], start=1):
        watchdog.on_step_end(trainer, result, seconds)
    assert watchdog.slow_steps == 1
    (line,) = trainer.lines
    assert line.startswith("warning: step 12 took 0.350 s, 3.5x the median 0.100 s")


def test_watchdog_judges_nothing_during_warm_up():
    watchdog, trainer = StepTimeWatchdog(), FakeTrainer()
    result = StepResult(loss=1.0, grad_norm=1.0, skipped=False)
    for seconds in (0.1, 5.0, 0.1, 9.0):  # compiles and caches in the first steps
        watchdog.on_step_end(trainer, result, seconds)
    assert trainer.lines == [] and watchdog.slow_steps == 0
