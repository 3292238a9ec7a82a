"""Launch discovery and the parallel plan: who is who, and how a config splits over a job."""

import os

import pytest

from lws_megatron.config import load_config
from lws_megatron.errors import UserError
from lws_megatron.training.distributed import discover, export, resolve_plan
from tests.helpers import TINY


def test_torchrun_variables_name_the_rank():
    env = discover(
        {
            "RANK": "3",
            "WORLD_SIZE": "8",
            "LOCAL_RANK": "1",
            "MASTER_ADDR": "node7",
            "MASTER_PORT": "4242",
        }
    )
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (3, 8, 1, "torchrun")
    assert (env.master_addr, env.master_port) == ("node7", 4242)


def test_a_lone_process_is_rank_0_of_1_with_a_free_port():
    env = discover({})
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (0, 1, 0, "single")
    assert 0 < env.master_port < 65536


def test_export_gives_torch_what_a_launcher_did_not(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "unset")  # restored (or removed) after the test
    export(discover({"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "5555"}))
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["MASTER_PORT"]) == (
        "1",
        "2",
        "5555",
    )
    assert os.environ["MASTER_ADDR"] == "127.0.0.1" and os.environ["LOCAL_RANK"] == "0"


def test_plan_splits_the_world_and_counts_micro_batches():
    config = load_config(
        TINY, ["parallel.tp=2", "train.global_batch_size=16", "train.micro_batch_size=2"]
    )
    plan = resolve_plan(config, 8)
    assert (plan.world, plan.tp, plan.pp, plan.dp) == (8, 2, 1, 4)
    assert plan.micro_batches == 2 and plan.layout is None and plan.vpp is None


def test_plan_with_a_virtual_pipeline_layout():
    config = load_config(TINY, ["parallel.pp=2", "parallel.pipeline_layout=Et|t|t|tL"])
    plan = resolve_plan(config, 2)
    assert plan.vpp == 2 and plan.layout == "Et|t|t|tL"


@pytest.mark.parametrize(
    "world, overrides, message",
    [
        (3, ["parallel.tp=2"], "3 processes can't hold parallel.tp=2 x parallel.pp=1"),
        (
            2,
            ["train.global_batch_size=6", "train.micro_batch_size=2"],
            "train.global_batch_size=6 is not a multiple of train.micro_batch_size=2 x "
            "data-parallel size 2",
        ),
        (2, ["parallel.pp=2", "parallel.pipeline_layout=Et*3|t*3L"], "parallel.pipeline_layout"),
    ],
)
def test_plans_a_job_cannot_run_are_refused_in_one_line(world, overrides, message):
    with pytest.raises(UserError, match=message.replace("*", r"\*").replace("|", r"\|")):
        resolve_plan(load_config(TINY, overrides), world)


def test_the_plan_is_immutable():
    plan = resolve_plan(load_config(TINY), 1)
    with pytest.raises(AttributeError):
        plan.dp = 2
