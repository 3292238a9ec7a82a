"""model.fused_loss: the chunked head + cross-entropy gives Megatron's loss and gradients, keeps no
[tokens, vocab] tensor for backward, and compiles as one graph."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from lws_megatron.config import Config, load_config
from lws_megatron.model.fused_loss import linear_cross_entropy
from tests.helpers import TINY
from tests.helpers.dist_utils import run_distributed


def test_chunks_that_do_not_divide_the_rows_give_torch_cross_entropy():
    torch.manual_seed(0)
    hidden = torch.randn(5, 7, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    labels = torch.randint(0, 40, (5, 7))
    grad = torch.rand(5, 7)
    loss = linear_cross_entropy(hidden, weight, labels, chunk_rows=8)  # 35 rows: 8+8+8+8+3
    logits = (hidden @ weight.t()).flatten(0, 1)
    expected = F.cross_entropy(logits, labels.flatten(), reduction="none").view(5, 7)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-5)
    got = torch.autograd.grad(loss, (hidden, weight), grad)
    want = torch.autograd.grad(expected, (hidden, weight), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5)


def test_bf16_autocast_runs_the_matmuls_in_bf16_and_the_softmax_in_fp32():
    torch.manual_seed(0)
    hidden = torch.randn(64, 32, requires_grad=True)
    weight = torch.randn(100, 32, requires_grad=True)
    labels = torch.randint(0, 100, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, labels, chunk_rows=24)
        logits = hidden @ weight.t()
    expected = F.cross_entropy(logits.float(), labels, reduction="none")
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-5)
    loss.sum().backward()
    assert hidden.grad.dtype == weight.grad.dtype == torch.float32


def _config(*overrides: str) -> Config:
    return load_config(TINY, list(overrides))


def _loss_and_grads(model, tokens, labels, mask) -> dict:
    """Per-token losses, the step's mean loss (forward.loss_func) and every parameter's
    gradient under that mean, by global name."""
    from lws_megatron.model import global_named_parameters
    from lws_megatron.training.forward import loss_func

    model.zero_grad()
    per_token = model(tokens, None, None, labels=labels)
    loss_sum, count, _ = loss_func(mask, per_token)
    loss = loss_sum / count
    loss.backward()
    grads = {name: p.grad.clone() for name, p in global_named_parameters(model)}
    return {"per_token": per_token.detach(), "loss": loss.detach(), "grads": grads}


def _fused_against_megatron(tp: int) -> list[dict[bool, dict]]:
    """For untied and tied heads, Megatron's path (False) and the fused one (True), same seed,
    same batch: `_loss_and_grads`, and the logits without labels."""
    from lws_megatron.model import build_model
    from lws_megatron.training.distributed import model_parallel
    from lws_megatron.training.train_module import model_args

    results = []
    for tied in (False, True):
        config = _config(f"parallel.tp={tp}", f"model.tie_embeddings={tied}")
        generator = torch.Generator().manual_seed(7)
        b, s = 3, config.model.seq_length
        tokens = torch.randint(0, config.model.vocab_size, (b, s), generator=generator)
        labels = torch.randint(0, config.model.vocab_size, (b, s), generator=generator)
        mask = (torch.rand(b, s, generator=generator) > 0.3).float()
        found = {}
        with model_parallel(config) as plan:
            args = model_args(config, plan, torch.device("cpu"))
            for fused in (False, True):
                head = dataclasses.replace(args.model, fused_loss=fused, loss_chunk_rows=40)
                model = build_model(dataclasses.replace(args, model=head), seed=5)
                found[fused] = _loss_and_grads(model, tokens, labels, mask)
                with torch.no_grad():
                    found[fused]["logits"] = model(tokens, None, None)
        results.append(found)
    return results


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("tp", [1, 2])
def test_fused_loss_gives_megatrons_loss_and_gradients(tp):
    # 96 rows in chunks of 40; a mask that drops about 30% of the tokens.
    for rank, per_tie in enumerate(run_distributed(_fused_against_megatron, tp, tp)):
        for tied, found in zip((False, True), per_tie):
            plain, fused = found[False], found[True]
            where = f"rank {rank}, tied={tied}"
            for key in ("per_token", "loss"):
                torch.testing.assert_close(fused[key], plain[key], rtol=0, atol=1e-5, msg=where)
            assert fused["grads"].keys() == plain["grads"].keys()
            for name, grad in plain["grads"].items():
                torch.testing.assert_close(
                    fused["grads"][name], grad, rtol=0, atol=1e-5, msg=f"{where}: {name}"
                )
            assert torch.equal(fused["logits"], plain["logits"]), where


def _saved_for_backward(tp: int, vocab_size: int) -> dict[bool, list[torch.Size]]:
    """Shapes of every tensor the whole model's forward saves for backward, Megatron's head
    (False) and the fused one (True); 96 rows."""
    from lws_megatron.model import build_model
    from lws_megatron.training.distributed import model_parallel
    from lws_megatron.training.train_module import model_args

    config = _config(f"parallel.tp={tp}", f"model.vocab_size={vocab_size}")
    tokens = torch.randint(0, vocab_size, (3, config.model.seq_length))
    found = {}
    with model_parallel(config) as plan:
        args = model_args(config, plan, torch.device("cpu"))
        for fused in (False, True):
            head = dataclasses.replace(args.model, fused_loss=fused)
            model = build_model(dataclasses.replace(args, model=head), seed=5)
            shapes = found[fused] = []
            with torch.autograd.graph.saved_tensors_hooks(
                lambda t: shapes.append(t.shape) or t, lambda t: t
            ):
                model(tokens, None, None, labels=tokens)
    return found


def _switched_off() -> dict[str, object]:
    """A fused model with `fused` off against a model built with Megatron's head: losses,
    and whether it saves a rows x vocabulary tensor for backward as Megatron's head does."""
    from lws_megatron.model import build_model
    from lws_megatron.training.distributed import model_parallel
    from lws_megatron.training.train_module import model_args

    config = _config("model.vocab_size=1000")
    tokens = torch.randint(0, 1000, (3, config.model.seq_length))
    with model_parallel(config) as plan:
        args = model_args(config, plan, torch.device("cpu"))
        models = {
            fused: build_model(
                dataclasses.replace(args, model=dataclasses.replace(args.model, fused_loss=fused)),
                seed=5,
            )
            for fused in (False, True)
        }
        models[True].fused = False
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t: shapes.append(t.shape) or t, lambda t: t
        ):
            switched = models[True](tokens, None, None, labels=tokens)
        plain = models[False](tokens, None, None, labels=tokens)
    return {"equal": torch.equal(switched, plain), "widest": max(s.numel() for s in shapes)}


@pytest.mark.distributed
def test_the_fused_head_switched_off_is_megatrons_head():
    (found,) = run_distributed(_switched_off, 1)
    assert found["equal"] and found["widest"] >= 3 * 32 * 1024


@pytest.mark.distributed
def test_the_fused_head_saves_no_tensor_of_rows_times_vocabulary():
    # vocab 1000 pads to 1024 per rank (TP=1): no other tensor of this model is that wide.
    (found,) = run_distributed(_saved_for_backward, 1, 1, 1000)
    rows_times_vocab = 3 * 32 * 1024
    assert any(shape.numel() >= rows_times_vocab for shape in found[False])
    assert max(shape.numel() for shape in found[True]) < rows_times_vocab


def _graphs_and_breaks(tp: int) -> dict[str, object]:
    """Dynamo's (graphs, breaks) for the whole fused chunk with its loss, and the loss and
    gradients of the chunk compiled whole (aot_eager: forward and backward graphs, no Inductor)
    against eager."""
    import torch._dynamo

    from lws_megatron.model import build_model
    from lws_megatron.model.compile import compile_stats, prepare_for_compile
    from lws_megatron.training.distributed import model_parallel
    from lws_megatron.training.train_module import model_args

    config = _config(f"parallel.tp={tp}", "model.fused_loss=true", "model.loss_chunk_rows=40")
    tokens = torch.randint(0, config.model.vocab_size, (3, config.model.seq_length))
    mask = torch.ones(tokens.shape)
    with model_parallel(config) as plan:
        model = build_model(model_args(config, plan, torch.device("cpu")), seed=5)
        prepare_for_compile(model)
        explained = torch._dynamo.explain(model)(tokens, None, None, labels=tokens)
        eager = _loss_and_grads(model, tokens, tokens, mask)
        before = compile_stats()
        model.compile(backend="aot_eager")
        compiled = _loss_and_grads(model, tokens, tokens, mask)
        after = compile_stats()
    return {
        "explained": (explained.graph_count, explained.graph_break_count),
        "breaks": after["graph_breaks"] - before["graph_breaks"],
        "eager": eager,
        "compiled": compiled,
    }


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("tp", [1, 2])
def test_the_fused_model_compiles_whole_with_the_same_numbers(tp):
    for rank, found in enumerate(run_distributed(_graphs_and_breaks, tp, tp)):
        assert found["explained"] == (1, 0), (rank, found["explained"])
        assert found["breaks"] == 0, rank
        eager, compiled = found["eager"], found["compiled"]
        torch.testing.assert_close(compiled["loss"], eager["loss"], rtol=0, atol=1e-5)
        for name, grad in eager["grads"].items():
            torch.testing.assert_close(compiled["grads"][name], grad, rtol=0, atol=1e-5, msg=name)
