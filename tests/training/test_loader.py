"""Batches built ahead in workers are exactly the step's batches, from any step on; the workers
ignore the signals that stop a run, and a worker's death does not stop the steps."""

import multiprocessing
import os
import signal
import socket
import time
from multiprocessing import resource_sharer

import pytest
import torch

from lws_megatron.config import load_config
from lws_megatron.training.data import build_datasets, resolve_sources, step_batches
from lws_megatron.training.distributed import resolve_plan
from lws_megatron.training.loader import StepLoader, _init_worker
from tests.helpers import TINY


@pytest.fixture(scope="module")
def train_ds(tmp_path_factory, tiny_data):
    config = load_config(
        TINY, [f"data.path=[{tiny_data['prefix']}]", f"data.tokenizer={tiny_data['tokenizer']}"]
    )
    dataset, _ = build_datasets(
        config, resolve_sources(config, verify=False), tmp_path_factory.mktemp("cache")
    )
    return config, dataset


@pytest.mark.parametrize("workers", [0, 2])
def test_the_loader_gives_each_steps_batches_from_a_resumed_step(train_ds, workers):
    config, dataset = train_ds
    plan = resolve_plan(config, 2)  # this is DP rank 1 of 2
    loaded = list(StepLoader(dataset, plan, 1, 7, 12, workers, torch.device("cpu")))
    assert [s.step for s in loaded] == [7, 8, 9, 10, 11]
    for got in loaded:
        expected = step_batches(dataset, got.step, plan, 1)
        assert len(got.batches) == len(expected)
        for a, b in zip(got.batches, expected):
            assert all(torch.equal(a[key], b[key]) for key in ("tokens", "labels", "loss_mask"))
        assert got.loss_tokens == int(sum(b["loss_mask"].sum() for b in expected))


class Broken:
    def __getitem__(self, i):
        raise ValueError(f"sample {i} is unreadable")


def test_a_failing_worker_raises_its_error_in_the_training_process(train_ds):
    config, _ = train_ds
    plan = resolve_plan(config, 1)
    with pytest.raises(ValueError, match="sample 0 is unreadable"):
        next(StepLoader(Broken(), plan, 0, 0, 3, 1, torch.device("cpu")))


def _same(got, expected) -> bool:
    return all(
        torch.equal(a[key], b[key])
        for a, b in zip(got.batches, expected)
        for key in ("tokens", "labels", "loss_mask")
    )


def test_workers_ignore_the_stop_signals_sent_to_the_whole_group(train_ds):
    config, dataset = train_ds
    plan = resolve_plan(config, 1)
    loader = StepLoader(dataset, plan, 0, 0, 6, 2, torch.device("cpu"))
    try:
        assert next(loader).step == 0
        for worker in loader._iterator._workers:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
                os.kill(worker.pid, sig)
        time.sleep(0.5)
        assert [s.step for s in loader] == [1, 2, 3, 4, 5] and loader.lost is None
    finally:
        loader.close()


def test_a_killed_worker_leaves_the_steps_to_the_training_process_and_says_so(train_ds):
    config, dataset = train_ds
    plan = resolve_plan(config, 1)
    loader = StepLoader(dataset, plan, 0, 0, 8, 2, torch.device("cpu"))
    try:
        assert next(loader).step == 0
        victim = loader._iterator._workers[1]
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(timeout=10)
        rest = list(loader)
    finally:
        loader.close()
    assert [s.step for s in rest] == list(range(1, 8))  # none lost, none repeated
    assert all(_same(s, step_batches(dataset, s.step, plan, 0)) for s in rest)
    assert loader.lost == _killed(1, victim.pid)


class _SlowRead:
    """Samples behind a file system that hangs."""

    def __getitem__(self, i):
        time.sleep(120)


def _train_then_wait(plan, pipe) -> None:
    loader = StepLoader(_SlowRead(), plan, 0, 0, 3, 2, torch.device("cpu"))
    pipe.send([worker.pid for worker in loader._iterator._workers])
    time.sleep(120)


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in "ZX"  # dead, maybe not yet reaped
    except FileNotFoundError:
        return True


def test_a_killed_trainer_takes_its_workers_with_it_even_mid_read(train_ds):
    """SIGKILL to a trainer whose workers are stuck in a read: they end with it, not 120 s
    later, when torch's watchdog would next look."""
    config, _ = train_ds
    context = multiprocessing.get_context("fork")
    ours, theirs = context.Pipe()
    trainer = context.Process(target=_train_then_wait, args=(resolve_plan(config, 1), theirs))
    trainer.start()
    workers = ours.recv()
    try:
        time.sleep(0.5)  # into the read
        os.kill(trainer.pid, signal.SIGKILL)
        trainer.join(timeout=10)
        deadline = time.monotonic() + 10
        while not all(map(_gone, workers)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(map(_gone, workers)), workers
    finally:
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _killed(index: int, pid: int) -> str:
    return (
        f"data loader worker {index} (pid {pid}) died: killed by SIGKILL (the kernel's "
        "out-of-memory killer?)"
    )


class _KilledMidHandover:
    """torch's iterator, whose next batch fails as when its worker dies while the training
    process fetches the batch's shared memory from it: the socket resets before the kernel
    has reaped the worker."""

    def __init__(self, iterator):
        self._inner, self._workers = iterator, iterator._workers

    def __next__(self):
        os.kill(self._workers[0].pid, signal.SIGKILL)
        raise ConnectionResetError(104, "Connection reset by peer")

    def _shutdown_workers(self):
        self._inner._shutdown_workers()


def test_a_worker_killed_while_it_hands_over_a_batch_is_a_dead_worker(train_ds):
    config, dataset = train_ds
    plan = resolve_plan(config, 1)
    loader = StepLoader(dataset, plan, 0, 0, 4, 2, torch.device("cpu"))
    try:
        assert next(loader).step == 0
        victim = loader._iterator._workers[0]
        loader._iterator = _KilledMidHandover(loader._iterator)
        rest = list(loader)
    finally:
        loader.close()
    assert [s.step for s in rest] == [1, 2, 3]
    assert all(_same(s, step_batches(dataset, s.step, plan, 0)) for s in rest)
    assert loader.lost == _killed(0, victim.pid)


def _share_a_file_descriptor(pipe, as_a_loader_worker: bool) -> None:
    if as_a_loader_worker:
        _init_worker(0)
    resource_sharer.DupFd(os.open(os.devnull, os.O_RDONLY))  # starts the sharer
    pipe.send(resource_sharer._resource_sharer._address)
    pipe.recv()


@pytest.mark.parametrize("as_a_loader_worker", [False, True])
def test_a_worker_whose_trainer_died_mid_handover_prints_no_traceback(capfd, as_a_loader_worker):
    """What a SIGKILLed trainer leaves: a worker's resource sharer, which hands a batch's
    shared memory over, finds its connection reset; a plain process prints the traceback."""
    context = multiprocessing.get_context("fork")
    ours, theirs = context.Pipe()
    worker = context.Process(target=_share_a_file_descriptor, args=(theirs, as_a_loader_worker))
    worker.start()
    trainer = socket.socket(socket.AF_UNIX)
    trainer.connect(ours.recv())
    time.sleep(0.2)  # the sharer's challenge arrives, and is never read
    trainer.close()
    time.sleep(0.5)
    ours.send(None)
    worker.join(timeout=10)
    printed = capfd.readouterr().err
    assert ("ConnectionResetError" in printed) is not as_a_loader_worker, printed
