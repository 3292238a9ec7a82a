"""torch.compile over the model: whole graphs, no breaks, the same numbers as eager."""

import pytest
import torch

from lws_megatron.model.compile import compile_stats
from tests.helpers import TINY
from tests.helpers.dist_utils import built_model, run_distributed

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def test_compile_stats_count_a_graph_break():
    def broken(x):
        y = x * 2
        print("a side effect Dynamo cannot trace")
        return y + 1

    before = compile_stats()
    torch.compile(broken, backend="eager")(torch.ones(3))
    after = compile_stats()
    assert after["graph_breaks"] == before["graph_breaks"] + 1
    assert after["compiled_graphs"] == before["compiled_graphs"] + 2


def _explain_layer_and_model(path: str, overrides: list[str]) -> dict[str, tuple[int, int]]:
    """(graphs, breaks) Dynamo finds in one layer and in the whole chunk with its loss, at TP=2
    (with sequence parallelism, on by default), in training mode."""
    import torch._dynamo

    from lws_megatron.config import load_config
    from lws_megatron.model.compile import prepare_for_compile

    config = load_config(path, ["parallel.tp=2", *overrides])
    with built_model(config) as model:
        prepare_for_compile(model)
        s, b = config.model.seq_length, 2
        tokens = torch.randint(0, config.model.vocab_size, (b, s))
        out = {}
        split = 2 if model.config.sequence_parallel else 1  # a layer's input: its rank's slice
        for i, layer in enumerate(model.decoder.layers):
            x = torch.randn(s // split, b, config.model.d_model, requires_grad=True)
            e = torch._dynamo.explain(layer)(
                x, attention_mask=None, rotary_pos_emb=model.rotary_pos_emb(s)
            )
            out[f"layer {i + 1}"] = (e.graph_count, e.graph_break_count)
        e = torch._dynamo.explain(model)(tokens, None, None, labels=tokens)
        out["model"] = (e.graph_count, e.graph_break_count)
        return out


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        # Megatron's checkpoint broke the graph at every recomputed layer, thrice per MLP.
        ["parallel.recompute=full", "parallel.recompute_layers=widest:2"],
        ["parallel.recompute=selective"],
    ],
    ids=["plain", "full_recompute", "selective_recompute"],
)
def test_layers_and_the_whole_model_are_single_graphs_on_every_tp_rank(overrides):
    # Rank 0 is where Megatron's row-parallel linear used to warn, breaking each layer in nine.
    found = run_distributed(_explain_layer_and_model, 2, str(TINY), overrides)
    for rank, graphs in enumerate(found):
        assert graphs and all(v == (1, 0) for v in graphs.values()), (rank, graphs)


def _saved_for_backward(path: str, runs: dict[str, list[str]]) -> dict[str, int]:
    """Bytes the compiled chunk saves for backward in a training forward (weights aside)."""
    from lws_megatron.config import load_config
    from lws_megatron.model.compile import compile_chunks

    out = {}
    for name, overrides in runs.items():
        config = load_config(path, ["train.precision=fp32", *overrides])
        with built_model(config) as model:
            compile_chunks([model], "model")
            tokens = torch.randint(0, config.model.vocab_size, (2, config.model.seq_length))
            seen = {p.untyped_storage().data_ptr() for p in model.parameters()}
            saved = [0]

            def pack(tensor, seen=seen, saved=saved):
                storage = tensor.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    saved[0] += storage.nbytes()
                return tensor

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                model(tokens, None, None, labels=tokens).sum().backward()
            out[name] = saved[0]
    return out


def test_compiled_recomputation_keeps_less_for_backward():
    runs = {
        "none": [],
        "selective": ["parallel.recompute=selective"],
        "full": ["parallel.recompute=full"],
    }
    (saved,) = run_distributed(_saved_for_backward, 1, str(TINY), runs)
    assert saved["full"] < 0.3 * saved["none"]
    assert saved["full"] < saved["selective"] < 0.8 * saved["none"]
