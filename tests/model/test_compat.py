"""The Megatron-Core compatibility layer, on whichever release is installed (CI runs both ends)."""

import functools

from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from lws_megatron.model.attention import SDPAttention
from lws_megatron.model.compat import with_submodules
from lws_megatron.model.spec import GroupedRowParallelLinear, layer_spec


def _submodules(spec):
    return spec.keywords["submodules"] if isinstance(spec, functools.partial) else spec.submodules


def test_with_submodules_replaces_in_a_module_spec_and_leaves_the_original():
    spec = ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1="fc1", linear_fc2="fc2"))
    new = with_submodules(spec, linear_fc2="mine")
    assert isinstance(new, ModuleSpec) and new.module is MLP
    assert (new.submodules.linear_fc1, new.submodules.linear_fc2) == ("fc1", "mine")
    assert spec.submodules.linear_fc2 == "fc2"


def test_with_submodules_replaces_in_a_partial_and_keeps_its_other_arguments():
    spec = functools.partial(
        dict, submodules=MLPSubmodules(linear_fc1="fc1", linear_fc2="fc2"), extra=3
    )
    new = with_submodules(spec, linear_fc2="mine")
    built = new()
    assert built["extra"] == 3
    assert (built["submodules"].linear_fc1, built["submodules"].linear_fc2) == ("fc1", "mine")
    assert spec.keywords["submodules"].linear_fc2 == "fc2"


def test_sdpa_layer_spec_uses_the_projects_attention_and_row_parallel_linears():
    layer = layer_spec("sdpa", qk_norm="head").submodules
    attention = _submodules(layer.self_attention)
    assert attention.q_layernorm is not IdentityOp and attention.k_layernorm is not IdentityOp
    assert attention.core_attention is SDPAttention
    assert attention.linear_proj is GroupedRowParallelLinear
    assert _submodules(layer.mlp).linear_fc2 is GroupedRowParallelLinear
