"""AdamW for the run's weights: torch's fused AdamW, over fp32 master copies when the model
holds bf16 weights (ZeRO-0; with ZeRO >= 1 DeepSpeed keeps and shards the masters itself)."""

from __future__ import annotations

import torch

from lws_megatron.config import Config
from lws_megatron.training import param_groups, weight_gather


class MasterWeightAdamW(torch.optim.AdamW):
    """Fused AdamW whose parameters are fp32 masters of the model's low-precision weights.

    `step` moves the model's gradients onto the masters, updates them (honouring `found_inf`
    and `grad_scale` as fused AdamW does: a flagged step changes nothing, not even the step
    count) and copies the result back into the model's weights, rounded to their dtype. The
    masters are in `state_dict`, so a resumed run continues from the fp32 values, not from
    their rounding.
    """

    reads_main_grad = True  # the fp32 `main_grad` of Megatron's DDP, not a bf16 rounding of it

    def __init__(self, groups: list[dict], **kwargs) -> None:
        self.model_params = [p for group in groups for p in group["params"]]
        masters = [
            {**group, "params": [p.detach().float().clone() for p in group["params"]]}
            for group in groups
        ]
        super().__init__(masters, fused=True, **kwargs)
        self.masters = [p for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def step(self, closure=None):
        for master, param in zip(self.masters, self.model_params):
            grad = getattr(param, "main_grad", param.grad)
            master.grad = None if grad is None else grad.float()
        super().step(closure)
        torch._foreach_copy_(self.model_params, self.masters)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for param in self.model_params:
            param.grad = None

    def state_dict(self) -> dict:
        return {**super().state_dict(), "masters": [m.detach().clone() for m in self.masters]}

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        masters = state_dict.pop("masters")
        super().load_state_dict(state_dict)
        with torch.no_grad():
            torch._foreach_copy_(self.masters, masters)
            torch._foreach_copy_(self.model_params, self.masters)


def build_optimizer(
    config: Config,
    module: torch.nn.Module,
    params_dtype: torch.dtype,
    gather_runs: list[list[torch.Tensor]] | None = None,
) -> torch.optim.Optimizer:
    """`gather_runs`: the segments the weight gather waits for (`weight_gather.py`), each
    its own group so that ZeRO shards and gathers it on its own."""
    o = config.optim
    groups = param_groups.param_groups(module, o.weight_decay, o.no_decay)
    if gather_runs:
        groups = weight_gather.split_groups(groups, gather_runs)
    kwargs = {"lr": o.lr, "betas": tuple(o.betas), "eps": o.eps}
    if params_dtype != torch.float32 and config.zero.stage == 0:
        return MasterWeightAdamW(groups, **kwargs)
    return torch.optim.AdamW(groups, fused=True, **kwargs)
