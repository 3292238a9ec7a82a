"""The master-weight AdamW behind train.precision=bf16: fp32 updates, bf16 weights."""

import copy
import io

import pytest
import torch

from lws_megatron.training.optimizer import MasterWeightAdamW

KW = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}


def _params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(5, 7, generator=g).to(dtype)) for _ in range(3)]


def _grads(step):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(5, 7, generator=g) for _ in range(3)]


def _step(optimizer, params, grads):
    for p, grad in zip(params, grads):
        p.grad = grad.to(p.dtype)
    optimizer.step()
    optimizer.zero_grad()


def test_over_fp32_weights_it_is_fused_adamw_exactly():
    ours, reference = _params(torch.float32), _params(torch.float32)
    opt = MasterWeightAdamW([{"params": ours}], **KW)
    ref = torch.optim.AdamW([{"params": reference}], fused=True, **KW)
    for step in range(3):
        _step(opt, ours, _grads(step))
        _step(ref, reference, _grads(step))
    for a, b in zip(ours, reference):
        assert torch.equal(a, b)


def test_bf16_weights_are_the_rounding_of_fp32_masters_updated_as_fp32():
    weights = _params(torch.bfloat16)
    reference = [torch.nn.Parameter(p.detach().float()) for p in weights]
    opt = MasterWeightAdamW([{"params": weights}], **KW)
    ref = torch.optim.AdamW([{"params": reference}], fused=True, **KW)
    for step in range(3):
        _step(opt, weights, _grads(step))
        _step(ref, reference, [g.bfloat16().float() for g in _grads(step)])
    for weight, master, expected in zip(weights, opt.masters, reference):
        assert weight.dtype == torch.bfloat16 and master.dtype == torch.float32
        assert torch.equal(master, expected)  # the update happened in fp32
        assert torch.equal(weight, master.bfloat16())


def test_a_flagged_step_changes_nothing_and_grad_scale_divides():
    weights = _params(torch.bfloat16)
    opt = MasterWeightAdamW([{"params": weights}], **KW)
    _step(opt, weights, _grads(0))
    before = [w.clone() for w in weights], [m.clone() for m in opt.masters]
    steps = [opt.state[m]["step"].clone() for m in opt.masters]
    opt.found_inf = torch.ones(())
    _step(opt, weights, [g * float("nan") for g in _grads(1)])
    assert all(torch.equal(a, b) for a, b in zip(weights, before[0]))
    assert all(torch.equal(a, b) for a, b in zip(opt.masters, before[1]))
    assert all(torch.equal(opt.state[m]["step"], s) for m, s in zip(opt.masters, steps))
    # grad_scale 4 on gradients 4x as large: the same update as without either
    opt.found_inf, opt.grad_scale = torch.zeros(()), torch.full((), 4.0)
    twin = MasterWeightAdamW([{"params": [w.detach().clone() for w in weights]}], **KW)
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    _step(opt, weights, [4 * g for g in _grads(2)])
    _step(twin, twin.model_params, _grads(2))
    for a, b in zip(opt.masters, twin.masters):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_a_saved_state_continues_bit_exactly_and_loads_without_pickle():
    weights = _params(torch.bfloat16)
    opt = MasterWeightAdamW([{"params": weights}], **KW)
    for step in range(2):
        _step(opt, weights, _grads(step))
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    resumed_weights = _params(torch.bfloat16, seed=1)  # different values: the state restores
    resumed = MasterWeightAdamW([{"params": resumed_weights}], **KW)
    resumed.load_state_dict(state)
    for step in range(2, 4):
        _step(opt, weights, _grads(step))
        _step(resumed, resumed_weights, _grads(step))
    for a, b in zip(opt.masters + weights, resumed.masters + resumed_weights):
        assert torch.equal(a, b)


def test_only_bf16_weights_at_zero_0_get_our_master_copies():
    from lws_megatron.config import load_config
    from lws_megatron.training.optimizer import build_optimizer
    from tests.helpers import TINY

    config = load_config(TINY)
    module = torch.nn.Linear(4, 4)
    assert type(build_optimizer(config, module, torch.float32)) is torch.optim.AdamW
    module.to(torch.bfloat16)
    assert isinstance(build_optimizer(config, module, torch.bfloat16), MasterWeightAdamW)
    zero_1 = load_config(TINY, ["zero.stage=1"])  # DeepSpeed keeps the masters
    assert type(build_optimizer(zero_1, module, torch.bfloat16)) is torch.optim.AdamW


def test_precisions_resolve_per_device_and_autocast_is_refused_on_cpu():
    from lws_megatron.errors import UserError
    from lws_megatron.training.precision import resolve_precision

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision("auto", cpu).params == torch.float32
    auto = resolve_precision("auto", cuda)
    assert (auto.name, auto.compute, auto.params) == ("bf16", torch.bfloat16, torch.bfloat16)
    mixed = resolve_precision("bf16-autocast", cuda)
    assert (mixed.compute, mixed.params) == (torch.bfloat16, torch.float32)
    assert resolve_precision("bf16", cpu).params == torch.bfloat16
    with pytest.raises(UserError, match="train.precision=bf16-autocast needs a CUDA device"):
        resolve_precision("bf16-autocast", cpu)
