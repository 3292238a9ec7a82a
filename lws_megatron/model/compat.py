"""Megatron-Core 0.16.1 through 0.19.x: the API differences this project meets, in one place.

CI runs the whole test suite at both ends (.ci/run). Each difference, and how it is handled:

1. Layer spec, MLP (models/gpt/gpt_layer_specs.py). 0.16 describes the MLP of a layer spec as
   `ModuleSpec(module=MLP, submodules=MLPSubmodules(...))`; 0.19 as
   `functools.partial(MLP.as_mlp_submodule, submodules=MLPSubmodules(...))`.
   `with_submodules` swaps submodules in either form (spec.py swaps linear_fc2).
2. Attention (transformer/attention.py). 0.19's SelfAttention refuses a q/k norm in the spec
   unless `TransformerConfig.qk_layernorm` is set; 0.16 builds whatever the spec names.
   build.py sets it for every QK-norm kind (its other use, a TP sum in finalize_model_grads,
   is not on our path).

Read in both sources and unchanged, so used directly: `heterogeneous_block_specs` and
`get_config_for_layer` (TransformerBlock), every TransformerConfig field build.py sets,
`get_forward_backward_func` and its arguments, the `parallel_state` functions used,
`PipelineParallelLayerLayout`, `BlendedMegatronDatasetBuilder` and `GPTDatasetConfig` (0.19 adds
`inter_document_masking`, defaulted), the TE layer spec's `qk_layernorm`, and the CUDA calls that
cuda_bridge.py bridges (still there in 0.19). DeepSpeed is 0.19.8 at both ends; torch 2.13 and
2.14.1 needed no change.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from megatron.core.transformer.spec_utils import ModuleSpec


def with_submodules(spec: ModuleSpec | functools.partial, **changes: Any):
    """`spec` with the named submodules replaced, in the form this Megatron-Core gave it."""
    if isinstance(spec, functools.partial):
        submodules = dataclasses.replace(spec.keywords["submodules"], **changes)
        return functools.partial(
            spec.func, *spec.args, **{**spec.keywords, "submodules": submodules}
        )
    return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, **changes))
