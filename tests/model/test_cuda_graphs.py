"""train.cuda_graphs: refused, naming the fix, wherever a captured step cannot run."""

import pytest
import torch

from lws_megatron.errors import UserError
from lws_megatron.model.compile import check_cuda_graphs

CUDA = torch.device("cuda")


@pytest.mark.parametrize(
    "mode, device, tp, pp, message",
    [
        ("model", torch.device("cpu"), 1, 1, "needs a CUDA device .*train.cuda_graphs=false"),
        ("none", CUDA, 1, 1, "but train.compile=none; set train.compile=model"),
        ("layers", CUDA, 1, 1, "but train.compile=layers; set train.compile=model"),
        ("model", CUDA, 2, 1, r"parallel.tp=1 and parallel.pp=1 only \(here 2 and 1\)"),
        ("model", CUDA, 1, 2, r"parallel.tp=1 and parallel.pp=1 only \(here 1 and 2\)"),
    ],
)
def test_where_cuda_graphs_cannot_run_is_refused(mode, device, tp, pp, message):
    with pytest.raises(UserError, match=message):
        check_cuda_graphs(mode, device, tp, pp)


def test_a_compiled_model_on_one_gpu_may_use_them():
    check_cuda_graphs("model", CUDA, 1, 1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_steps_train_like_the_compiled_ones():
    """Replayed steps give the compiled model's losses (tiny model, one GPU)."""
    from lws_megatron.config import load_config
    from lws_megatron.measure.batches import synthetic_batch
    from lws_megatron.training import distributed
    from lws_megatron.training.train_module import TrainModule
    from tests.helpers import TINY

    distributed.init_processes()
    losses = {}
    for graphs in (False, True):
        config = load_config(
            TINY,
            ["train.compile=model", f"train.cuda_graphs={graphs}", "train.global_batch_size=2"],
        )
        with distributed.model_parallel(config) as plan:
            module = TrainModule(config, plan, CUDA)
            module.compile()
            batch = [synthetic_batch(config, plan.micro_batch_size)]
            losses[graphs] = [module.train_batch(batch).loss.item() for _ in range(4)]
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-3, atol=1e-3)
