"""The step's numbers stay on the device between reads, and a read brings them all over once."""

import math
import time

import pytest
import torch

from lws_megatron.device import count_syncs
from lws_megatron.training.step_stats import ForwardClock, StepResult, StepStats, StopRequests

CPU = torch.device("cpu")


def _result(loss: float, norm: float = 1.0, skipped: bool = False):
    metrics = {"loss": (torch.tensor(loss), "mean"), "grad_norm": (torch.tensor(norm), "last")}
    return StepResult(torch.tensor(float(skipped)), metrics)


def test_an_interval_averages_the_applied_steps_and_reads_the_device_once():
    stats = StepStats(CPU)
    with count_syncs(CPU) as counter:
        for result in (_result(2.0), _result(math.inf, skipped=True), _result(4.0, norm=0.5)):
            stats.add(result)
        assert counter.count == 0
        interval = stats.read(time.perf_counter())
    assert counter.count == 1
    assert (interval.steps, interval.steps - interval.skipped, interval.skipped) == (3, 2, 1)
    assert interval.metrics == {"loss": 3.0, "grad_norm": 0.5}
    assert interval.nonfinite_run == 1


def test_a_run_of_non_finite_steps_is_counted_across_reads():
    stats = StepStats(CPU)
    stats.add(_result(1.0))
    stats.add(_result(math.nan, skipped=True))
    assert stats.read(time.perf_counter()).nonfinite_run == 1
    stats.add(_result(math.nan, skipped=True))
    stats.add(_result(math.nan, skipped=True))
    interval = stats.read(time.perf_counter())
    assert interval.nonfinite_run == 3 and math.isnan(interval.metrics["loss"])
    assert interval.skipped == interval.steps
    stats.add(_result(1.5))
    assert stats.read(time.perf_counter()).nonfinite_run == 0


def test_a_finite_loss_with_a_skipped_update_is_not_averaged():
    stats = StepStats(CPU)
    stats.add(_result(1.0))
    stats.add(_result(7.0, skipped=True))  # a non-finite gradient: the update was skipped
    interval = stats.read(time.perf_counter())
    assert interval.metrics["loss"] == 1.0 and interval.skipped == 1
    assert interval.nonfinite_run == 1


def test_metrics_by_name_span_the_log_interval_and_are_read_with_the_rest():
    """A read between log steps (an evaluation's) brings them over but keeps counting."""
    stats = StepStats(CPU)
    with count_syncs(CPU) as counter:
        stats.add(_result(2.0))
        stats.record("tokens_seen", torch.tensor(10.0), "mean")
        stats.record("scale", torch.tensor(1.0), "last")
        between = stats.read(time.perf_counter(), log=False)
        stats.add(_result(4.0, norm=0.5))
        stats.record("tokens_seen", torch.tensor(20.0), "mean")
        stats.record("scale", torch.tensor(3.0), "last")
        assert counter.count == 1
        logged = stats.read(time.perf_counter())
    assert counter.count == 2
    assert between.metrics == {"loss": 2.0, "grad_norm": 1.0, "tokens_seen": 10.0, "scale": 1.0}
    assert logged.metrics == {"loss": 3.0, "grad_norm": 0.5, "tokens_seen": 15.0, "scale": 3.0}
    assert stats.read(time.perf_counter()).metrics == {}


def test_an_unknown_reduce_is_refused():
    with pytest.raises(ValueError, match="reduce 'max'"):
        StepStats(CPU).record("x", torch.tensor(1.0), "max")


def test_a_stop_request_is_known_at_the_step_that_carried_it_without_a_device_read():
    requests = StopRequests(CPU)
    with count_syncs(CPU) as counter:
        requests.record(torch.tensor(0.0))
        assert not requests.any()
        requests.record(torch.tensor(2.0))  # two ranks asked
        assert requests.any()
        requests.record(torch.tensor(0.0))
        assert not requests.any()
    assert counter.count == 0


def test_the_forward_clock_sums_the_timed_work_until_asked():
    clock = ForwardClock(CPU)
    for _ in range(2):
        with clock.timed():
            time.sleep(0.05)
    time.sleep(0.1)  # not timed
    assert 0.1 <= clock.seconds() < 0.15
    assert clock.seconds() == 0.0


def test_count_syncs_counts_each_kind_of_read():
    t = torch.ones(3)
    with count_syncs(CPU) as counter:
        t.sum().item()
        t.tolist()
        bool(t.any())
        float(t[0])
        t.add(1)  # compute alone is not a read
        int(torch.arange(3).max())  # token ids: host data on every device
    assert counter.count == 4


def test_the_forward_clock_leaves_out_the_waits_for_other_ranks():
    """A straggler is found by its forward time; the others' waits for its part of the weight
    gather must not count as theirs."""
    clock = ForwardClock(CPU)
    with clock.timed():
        time.sleep(0.05)
        with clock.excluded():
            time.sleep(0.2)
    assert 0.04 < clock.seconds() < 0.15
    assert clock.seconds() == 0.0  # read once
