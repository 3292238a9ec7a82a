"""OLMo-2's block on Megatron-Core: norms after each sublayer, QK-norm over the whole projection.

The paper trained its models on OLMo-2 (OLMo-core). Two pieces differ from Megatron's layer:
- `PostNormTransformerLayer`: `h = x + norm(attn(x))`, `out = h + norm(mlp(h))`. Megatron's
  layer already ends each sublayer in a bias-dropout-add; this layer norms the sublayer's output
  there and leaves the input norms as identities, so the rest of Megatron's forward (recompute,
  TP, PP, compile) runs unchanged.
- `FullQKNorm`: one RMSNorm over all query heads x d_head (or all KV heads x d_head) at each
  position. Under TP each rank holds a slice of the heads, so the sum of squares is all-reduced
  over the TP group (in forward and in backward) and the gain is split with the heads; its
  `sharded_state_dict` says so, so that a checkpoint holds the whole gain, whatever the TP.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Literal, Union

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayerSubmodules
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from lws_megatron.model.compat import with_submodules
from lws_megatron.model.recompute import RecomputableLayer


class FullQKNorm(torch.nn.Module):
    """RMSNorm over the whole q (`heads="query"`) or k (`heads="kv"`) projection of a position.

    Built where Megatron builds `q_layernorm` / `k_layernorm` and called on the same
    [s, b, heads per rank, d_head] tensor. The result is the same at any TP size.
    """

    def __init__(
        self,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-6,
        heads: Literal["query", "kv"] = "query",
    ):
        super().__init__()
        tp = config.tensor_model_parallel_size
        count = config.num_attention_heads if heads == "query" else config.num_query_groups
        self.width = count * hidden_size  # hidden_size is d_head, as Megatron passes it
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(self.width // tp, dtype=config.params_dtype))
        set_tensor_model_parallel_attributes(self.weight, is_parallel=True, dim=0, stride=1)
        # Passed explicitly: Megatron warns when it looks the group up itself, and to
        # torch.compile each warning is a graph break.
        self.group = parallel_state.get_tensor_model_parallel_group() if tp > 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        squares = x.square().sum(dim=(-2, -1), keepdim=True)
        if self.group is not None:
            squares = _SumOverRanks.apply(squares, self.group)
        x = x * torch.rsqrt(squares / self.width + self.eps)
        return (x * self.weight.view(x.shape[-2:])).to(dtype)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """The gain split over TP along its only axis (Megatron's default for a module without
        this method would save each rank's slice as the whole, replicated gain)."""
        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(state, prefix, {"weight": 0}, sharded_offsets)


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) in forward and in backward: every rank's heads use the sum, so its
    gradient is the sum of all ranks' gradients. Megatron's mappings pair an all-reduce with an
    identity, and chaining two of them all-reduces a view in place, which torch.compile
    refuses; this one works on copies."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        tensor = tensor.clone()
        dist.all_reduce(tensor, group=group)
        return tensor

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def full_qk_norm_specs() -> tuple[ModuleSpec, ModuleSpec]:
    """(q_layernorm, k_layernorm) specs for `model.qk_norm=full`."""
    return (
        ModuleSpec(module=FullQKNorm, params={"heads": "query"}),
        ModuleSpec(module=FullQKNorm, params={"heads": "kv"}),
    )


@dataclass
class PostNormLayerSubmodules(TransformerLayerSubmodules):
    post_attention_layernorm: Union[ModuleSpec, type] = IdentityOp
    post_mlp_layernorm: Union[ModuleSpec, type] = IdentityOp


class PostNormTransformerLayer(RecomputableLayer):
    """Megatron's layer with OLMo-2's reordered norm; `input_layernorm` and
    `pre_mlp_layernorm` should be identities in its spec (see `post_norm_spec`)."""

    def __init__(
        self, config: TransformerConfig, submodules: PostNormLayerSubmodules, *args, **kwargs
    ):
        super().__init__(config, submodules, *args, **kwargs)
        self.post_attention_layernorm = self._norm(submodules.post_attention_layernorm)
        self.post_mlp_layernorm = self._norm(submodules.post_mlp_layernorm)
        self.self_attn_bda = _norm_then(self.post_attention_layernorm, self.self_attn_bda)
        self.mlp_bda = _norm_then(self.post_mlp_layernorm, self.mlp_bda)

    def _norm(self, spec: Union[ModuleSpec, type]) -> torch.nn.Module:
        return build_module(
            spec,
            config=self.config,
            hidden_size=self.config.hidden_size,
            eps=self.config.layernorm_epsilon,
        )


def _norm_then(norm: torch.nn.Module, bda: Callable) -> Callable:
    """A bias-dropout-add factory whose add norms the sublayer's output (bias included) first."""

    def factory(training: bool, fused: bool) -> Callable:
        add = bda(training, fused)

        def norm_add(output_with_bias, residual, prob):
            output, bias = output_with_bias
            if bias is not None:
                output = output + bias
            return add((norm(output), None), residual, prob)

        return norm_add

    return factory


def post_norm_spec(spec: ModuleSpec, norm: type, unfused_linear: type | None = None) -> ModuleSpec:
    """`spec` (a freshly built pre-norm layer spec, changed in place) as a post-norm layer with
    `norm` after each sublayer.

    `unfused_linear` replaces Transformer Engine's norm-fused input linears (whose fused norm
    would be a pre-norm) by plain column-parallel ones.
    """
    sub = spec.submodules
    if unfused_linear is not None:
        sub.self_attention = with_submodules(sub.self_attention, linear_qkv=unfused_linear)
        sub.mlp = with_submodules(sub.mlp, linear_fc1=unfused_linear)
    fields = {f.name: getattr(sub, f.name) for f in dataclasses.fields(sub)}
    fields.update(
        input_layernorm=IdentityOp,
        pre_mlp_layernorm=IdentityOp,
        post_attention_layernorm=norm,
        post_mlp_layernorm=norm,
    )
    return ModuleSpec(
        module=PostNormTransformerLayer,
        params=spec.params,
        submodules=PostNormLayerSubmodules(**fields),
    )
