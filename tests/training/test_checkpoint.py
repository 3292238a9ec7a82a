"""The checkpointer on a real train module (gloo ranks): exact round trips, in the background
too, pruning that never loses the newest, damaged checkpoints set aside, files that would run
code refused, and a full disk that leaves nothing behind."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import TINY
from tests.helpers.dist_utils import DistributedFailure, run_distributed

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


MARKER_NAME = "CODE_RAN"
LAYOUT = {"tp": 1, "pp": 1, "dp": 1}


class _Payload:
    """Unpickling this runs a command: what a crafted checkpoint file would do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _module():
    """The tiny model's train module (ZeRO-1: DeepSpeed's partition of the optimizer state)."""
    import torch.distributed as dist

    from lws_megatron.config import load_config
    from lws_megatron.training.distributed import resolve_plan
    from lws_megatron.training.train_module import TrainModule

    config = load_config(TINY, ["zero.stage=1"])
    return TrainModule(config, resolve_plan(config, dist.get_world_size()), torch.device("cpu"))


def _weights(module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.chunks[0].state_dict().items() if v is not None}


def _checkpointer(run_dir: str, keep: int = 2, async_save: bool = False):
    from lws_megatron.training.checkpoint import Checkpointer

    return Checkpointer(Path(run_dir), keep, {"model": "tiny"}, LAYOUT, async_save=async_save)


def _round_trip(run_dir: str, async_save: bool) -> dict:
    from lws_megatron.config import load_config
    from lws_megatron.training.distributed import model_parallel

    with model_parallel(load_config(TINY, ["zero.stage=1"])):
        module = _module()
        ck = _checkpointer(run_dir, async_save=async_save)
        saved = _weights(module)
        done = ck.save(module, 3, {"skipped_steps": 1})
        visible = (Path(run_dir) / "checkpoints" / "step_00000003").exists()
        draws = (random.random(), torch.rand(3))
        for p in module.chunks[0].parameters():
            p.data.add_(1.0)  # the step goes on while the files are written
        done += ck.wait()
        state = ck.resume(module)
        after = (random.random(), torch.rand(3))
        restored = _weights(module)
    return {
        "state": state,
        "done": [Path(p).name for p in done],
        "visible_before_wait": visible,
        "draws_equal": draws[0] == after[0] and torch.equal(draws[1], after[1]),
        "weights_equal": all(torch.equal(saved[k], restored[k]) for k in saved),
    }


@pytest.mark.parametrize("async_save", [False, True])
def test_a_checkpoint_restores_weights_rng_and_run_state(tmp_path, async_save):
    (out,) = run_distributed(_round_trip, 1, str(tmp_path), async_save)
    assert out["weights_equal"] and out["draws_equal"]
    assert out["state"]["step"] == 3 and out["state"]["skipped_steps"] == 1
    assert out["done"] == ["step_00000003"]
    # in the background, the checkpoint appears only once its files are complete (at wait)
    assert out["visible_before_wait"] is not async_save
    meta = json.loads((tmp_path / "checkpoints" / "step_00000003" / "meta.json").read_text())
    assert meta["files"] and all(len(f["sha256"]) == 64 for f in meta["files"].values())
    for rel, record in meta["files"].items():  # the writers' hashes are those of the files
        data = (tmp_path / "checkpoints" / "step_00000003" / rel).read_bytes()
        assert hashlib.sha256(data).hexdigest() == record["sha256"], rel


def _save_steps(
    run_dir: str, steps: list[int], keep: int, fail_at: int | None = None, async_save=False
) -> str:
    """Save at `steps`; at `fail_at` the disk is full. Returns the error line, if any."""
    from lws_megatron.config import load_config
    from lws_megatron.errors import UserError
    from lws_megatron.training.distributed import model_parallel

    write = os.write

    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with model_parallel(load_config(TINY, ["zero.stage=1"])):
        module = _module()
        ck = _checkpointer(run_dir, keep, async_save)
        try:
            for step in steps:
                ck.wait()  # the save before, in the background, with the disk as it was
                os.write = full if step == fail_at else write
                ck.save(module, step, {"skipped_steps": 0})
            ck.wait()
        except UserError as err:
            return str(err)
        finally:
            os.write = write
    return ""


def _names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def test_pruning_keeps_the_newest_and_never_the_just_saved_one(tmp_path):
    (error,) = run_distributed(_save_steps, 1, str(tmp_path), [1, 2, 3, 4], 2, None, True)
    assert error == ""
    assert _names(tmp_path) == ["latest", "step_00000003", "step_00000004"]
    # A checkpoint numbered above the one being saved (from before a fall-back) is not pruned
    # in its place: the save just completed survives.
    (error,) = run_distributed(_save_steps, 1, str(tmp_path), [2], 1)
    assert "step_00000002" in _names(tmp_path)
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000002"


@pytest.mark.parametrize("async_save", [False, True])
def test_a_full_disk_fails_in_one_line_and_leaves_no_partial_checkpoint(tmp_path, async_save):
    (error,) = run_distributed(_save_steps, 1, str(tmp_path), [1, 2], 2, 2, async_save)
    assert re.fullmatch(
        r"checkpoint step_00000002 was not saved: \S+step_00000002\.tmp/\S+: No space left on "
        r"device; free space there or write elsewhere; the checkpoints before it are kept",
        error,
    ), error
    assert _names(tmp_path) == ["latest", "step_00000001"]


def _save_past_a_size_limit(run_dir: str, failing_rank: int) -> dict:
    """Save step 1; step 2 with writes of more than 64 KiB refused by the kernel on
    `failing_rank` (EFBIG: the failed write() a full disk gives too, under another errno);
    then step 3 with the limit lifted."""
    import resource
    import signal

    import torch.distributed as dist

    from lws_megatron.config import load_config
    from lws_megatron.errors import UserError
    from lws_megatron.training.distributed import model_parallel

    unlimited = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
    with model_parallel(load_config(TINY, ["zero.stage=1"])):
        module = _module()
        ck = _checkpointer(run_dir, 3, async_save=True)
        ck.save(module, 1, {"skipped_steps": 0})
        ck.wait()
        if dist.get_rank() == failing_rank:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
            resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, resource.RLIM_INFINITY))
        try:
            ck.save(module, 2, {"skipped_steps": 0})
            ck.wait()
            error = ""
        except UserError as err:
            error = str(err)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, unlimited)
        after = _names(Path(run_dir))  # rank 0 has removed the partial save
        dist.barrier()  # listed before any rank starts step 3
        ck.save(module, 3, {"skipped_steps": 0})
        ck.wait()
    return {"error": error, "after": after}


@pytest.mark.parametrize("world, failing_rank", [(1, 0), (2, 1)])
def test_a_failed_write_of_torch_save_is_one_line_on_every_rank(tmp_path, world, failing_rank):
    outs = run_distributed(_save_past_a_size_limit, world, str(tmp_path), failing_rank, timeout=300)
    for out in outs:
        assert re.fullmatch(
            rf"checkpoint step_00000002 was not saved: \S+step_00000002\.tmp/__{failing_rank}_0"
            r"\.distcp: File too large; the file outgrew a file-size limit .*; the checkpoints "
            r"before it are kept",
            out["error"],
        ), out["error"]
    assert outs[0]["after"] == ["latest", "step_00000001"]
    assert _names(tmp_path) == ["latest", "step_00000001", "step_00000003"]


def _resume(run_dir: str) -> dict:
    from lws_megatron.config import load_config
    from lws_megatron.errors import UserError
    from lws_megatron.training.distributed import model_parallel

    with model_parallel(load_config(TINY, ["zero.stage=1"])):
        module = _module()
        try:
            state = _checkpointer(run_dir).resume(module)
            return {"step": state and state["step"]}
        except UserError as err:
            return {"error": str(err)}


def _damage(checkpoint: Path, rel: str, data: bytes | None = None, rehash: bool = False) -> None:
    target = checkpoint / rel
    target.write_bytes(data if data is not None else target.read_bytes()[:100])
    if rehash:  # a crafted file whose author also rewrote the recorded hash
        meta = json.loads((checkpoint / "meta.json").read_text())
        meta["files"][rel] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        (checkpoint / "meta.json").write_text(json.dumps(meta))


def test_a_damaged_latest_is_set_aside_and_the_one_before_resumed(tmp_path, capfd):
    run_distributed(_save_steps, 1, str(tmp_path), [1, 2], 3)
    _damage(tmp_path / "checkpoints" / "step_00000002", "__0_0.distcp")
    (out,) = run_distributed(_resume, 1, str(tmp_path))
    assert out == {"step": 1}
    assert "step_00000002.damaged" in _names(tmp_path)
    assert "__0_0.distcp has 100 bytes" in capfd.readouterr().out


def test_only_damaged_checkpoints_left_is_an_error_not_a_fresh_start(tmp_path):
    run_distributed(_save_steps, 1, str(tmp_path), [1], 3)
    _damage(tmp_path / "checkpoints" / "step_00000001", "rng/rank00000.pt")
    (out,) = run_distributed(_resume, 1, str(tmp_path))
    assert "no intact checkpoint left" in out["error"]


def _crafted_shards(checkpoint: Path, payload: bytes) -> None:
    """The payload as every slice of __0_0.distcp, .metadata pointing there, hashes rewritten."""
    from lws_megatron.training import shards

    metadata = shards.read_metadata(checkpoint / ".metadata")
    for index, info in metadata.storage_data.items():
        info.offset, info.length = 0, len(payload)
    _damage(checkpoint, "__0_0.distcp", payload, rehash=True)
    _damage(checkpoint, ".metadata", pickle.dumps(metadata), rehash=True)


@pytest.mark.parametrize(
    "rel, protocol",
    [("rng/rank00000.pt", 2), ("common.pt", 4), ("__0_0.distcp", 2), (".metadata", 2)],
)
def test_a_checkpoint_file_that_would_run_code_is_refused(tmp_path, capfd, rel, protocol):
    run_distributed(_save_steps, 1, str(tmp_path), [1], 3)
    marker = tmp_path / MARKER_NAME
    checkpoint = tmp_path / "checkpoints" / "step_00000001"
    payload = pickle.dumps({"state": _Payload(str(marker))}, protocol=protocol)
    if rel == "__0_0.distcp":
        _crafted_shards(checkpoint, payload)
    else:
        _damage(checkpoint, rel, payload, rehash=True)
    capfd.readouterr()
    (out,) = run_distributed(_resume, 1, str(tmp_path))
    assert "refused to load: it holds objects that could run code" in out["error"]
    assert rel.split("/")[-1] in out["error"] and "\n" not in out["error"]
    if protocol == 2:  # the payload's global is named
        assert "it asks for posix.system" in out["error"]
    # none of PyTorch's advice, which would run the code: weights_only=False, allow-listing it
    assert "weights_only" not in out["error"] and "safe_globals" not in out["error"]
    assert "file an issue" not in capfd.readouterr().err
    assert not marker.exists()


@pytest.mark.parametrize("record", ["{}", "[]", '{"format": 3, "step": 2}', "not json"])
def test_a_meta_json_that_is_no_record_falls_back_to_the_checkpoint_before(tmp_path, capfd, record):
    run_distributed(_save_steps, 1, str(tmp_path), [1, 2], 3)
    (tmp_path / "checkpoints" / "step_00000002" / "meta.json").write_text(record)
    (out,) = run_distributed(_resume, 1, str(tmp_path))
    assert out == {"step": 1}
    assert "step_00000002 is damaged (its meta.json is not a checkpoint record)" in (
        capfd.readouterr().out
    )
    assert _names(tmp_path) == ["latest", "step_00000001", "step_00000002.damaged"]


@pytest.mark.parametrize(
    "record, message",
    [
        ({}, "written by an earlier lws-megatron, whose checkpoints load by unpickling"),
        ({"format": 2, "files": {}}, "is in checkpoint format 2, this lws-megatron reads format 3"),
    ],
)
def test_a_checkpoint_of_an_earlier_format_is_refused_not_set_aside(tmp_path, record, message):
    run_distributed(_save_steps, 1, str(tmp_path), [1], 3)
    earlier = {"step": 1, "state": {"skipped_steps": 0}, "fingerprint": {"model": "tiny"}}
    (tmp_path / "checkpoints" / "step_00000001" / "meta.json").write_text(
        json.dumps({**earlier, **record})
    )
    (out,) = run_distributed(_resume, 1, str(tmp_path))
    assert message in out["error"]
    assert _names(tmp_path) == ["latest", "step_00000001"]


def _killed_while_pruning(run_dir: str) -> None:
    """Save steps 1 and 2 keeping one: SIGKILL halfway through removing step 1, its rng/ left."""
    import shutil
    import signal

    from lws_megatron.config import load_config
    from lws_megatron.training.distributed import model_parallel

    remove = shutil.rmtree

    def cut_short(path, *args, **kwargs):
        path = Path(path)
        if path.name.startswith("step_00000001") and path.exists():
            (path / "meta.json").unlink()
            (path / "__0_0.distcp").unlink()
            os.kill(os.getpid(), signal.SIGKILL)
        remove(path, *args, **kwargs)

    with model_parallel(load_config(TINY, ["zero.stage=1"])):
        module = _module()
        ck = _checkpointer(run_dir, keep=1)
        ck.save(module, 1, {"skipped_steps": 0})
        shutil.rmtree = cut_short
        ck.save(module, 2, {"skipped_steps": 0})


def _start_again(run_dir: str) -> list[str]:
    from lws_megatron.config import load_config
    from lws_megatron.training.distributed import model_parallel

    with model_parallel(load_config(TINY, ["zero.stage=1"])):
        _checkpointer(run_dir).remove_partial()
    return _names(Path(run_dir))


def test_a_prune_cut_short_leaves_nothing_after_the_next_start(tmp_path):
    with pytest.raises(DistributedFailure, match="exited with code -9"):
        run_distributed(_killed_while_pruning, 1, str(tmp_path))
    (names,) = run_distributed(_start_again, 1, str(tmp_path))
    assert names == ["latest", "step_00000002"]


def test_what_an_earlier_prune_left_is_removed_at_start(tmp_path):
    run_distributed(_save_steps, 1, str(tmp_path), [1, 2, 3], 3)
    for step in (1, 3):  # a step directory without its record: only rng/ left
        remnant = tmp_path / "checkpoints" / f"step_0000000{step}"
        (remnant / "meta.json").unlink()
        (remnant / "__0_0.distcp").unlink()
        shutil.rmtree(remnant / "rng")
    (names,) = run_distributed(_start_again, 1, str(tmp_path))
    # below the newest complete checkpoint only; one above it is left for a person to judge
    assert names == ["latest", "step_00000002", "step_00000003"]
