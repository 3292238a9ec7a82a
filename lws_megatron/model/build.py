"""Build Megatron-Core's GPTModel for an LWS config, on any device, with layout-independent init.

Megatron draws initial weights in construction order, so a layer's weights depend on which
layers the same rank built before it: TP=1 and PP=2 would start from different models. Here
Megatron builds with a no-op init and `init_weights` then draws every parameter on the CPU from
its own generator, keyed by the seed and the parameter's global name, and keeps this rank's TP
shard. Same seed, same full weights, whatever the TP and PP split and whatever the device.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from typing import Iterator

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.transformer_block import get_num_layers_to_build

from lws_megatron.device import default_device
from lws_megatron.errors import UserError
from lws_megatron.model import cuda_bridge
from lws_megatron.model.args import ModelArgs
from lws_megatron.model.attention import check_kernel
from lws_megatron.model.fused_loss import FusedLossGPTModel
from lws_megatron.model.spec import LWSTransformerConfig, block_spec, resolve_backend


def _drawn_later(tensor: torch.Tensor) -> torch.Tensor:
    """Megatron's init hook, left empty: `init_weights` draws every weight after the build."""
    return tensor


def transformer_config(
    args: ModelArgs, *, device: torch.device | str | None = None
) -> LWSTransformerConfig:
    """Megatron's TransformerConfig for the model of `args` at its TP / PP split."""
    device = torch.device(device) if device is not None else default_device()
    m, layers = args.model, args.layers
    backend = resolve_backend(m.attention_backend, device)
    if backend == "te" and m.sdpa_kernel != "auto":
        raise UserError(
            f"model.sdpa_kernel={m.sdpa_kernel} picks a kernel of the sdpa attention "
            "backend, but Transformer Engine runs this model; set "
            "model.attention_backend=sdpa or model.sdpa_kernel=auto"
        )
    return LWSTransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.d_model,
        kv_channels=m.d_head,
        # Model-wide values Megatron checks once; each layer overrides them (spec.py).
        ffn_hidden_size=layers[0].ffn_hidden_size,
        num_attention_heads=layers[0].num_query_heads,
        num_query_groups=layers[0].num_kv_heads,
        layer_shapes=layers,
        sdpa_kernel=m.sdpa_kernel,
        init=m.init,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_eps,
        # Megatron-Core 0.19 refuses a q/k norm in the spec without this. Its one other use,
        # summing q/k norm gradients over TP in finalize_model_grads, is not on our path:
        # grads.py sums the shared per-head gain and leaves the TP-split full-width gain alone.
        qk_layernorm=m.qk_norm != "none",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_std,
        init_method=_drawn_later,
        output_layer_init_method=_drawn_later,
        embedding_init_method=_drawn_later,
        tensor_model_parallel_size=args.tp,
        pipeline_model_parallel_size=args.pp,
        pipeline_model_parallel_layout=args.layout,
        sequence_parallel=args.sequence_parallel,
        recompute=args.recompute,
        recomputed_layers=args.recomputed_layers,
        # Batched p2p posts both directions' sends to one peer together; with PP=2 and a
        # virtual pipeline gloo then pairs an activation with a gradient. Megatron's unbatched
        # path orders sends and receives by rank parity and keeps the directions apart.
        batch_p2p_comm=False,
        # Weights in their dtype (bf16, or fp32 with bf16 from autocast around the forward),
        # and the residual stream handed between pipeline stages in the same dtype.
        params_dtype=args.params_dtype,
        pipeline_dtype=args.params_dtype,
        use_cpu_initialization=device.type != "cuda",
        transformer_impl="transformer_engine" if backend == "te" else "local",
        **_fusions(args.fused_kernels and device.type == "cuda"),
    )


def _fusions(fused: bool) -> dict:
    """Megatron's fused SwiGLU and vocab-parallel cross-entropy (compiled by its jit_fuser)
    pay off on an eager GPU model; on CPU they would only add compile time to every process
    start, and under train.compile Inductor fuses the plain ops itself, in the very graphs
    that the compile tests check for breaks on CPU."""
    return {
        "bias_activation_fusion": fused,
        "cross_entropy_loss_fusion": fused,
        "cross_entropy_fusion_impl": "native",
    }


def build_model(
    args: ModelArgs,
    *,
    seed: int,
    vp_stage: int | None = None,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    device: torch.device | str | None = None,
) -> GPTModel:
    """One model chunk of this rank: its pipeline stage's layers, at their LWS sizes.

    Needs Megatron's model-parallel state (`training.distributed`). `pre_process` and
    `post_process` default to whether this chunk holds the embedding / the output head.
    `device="meta"` builds without allocating weights (for counting parameters). Weights are
    drawn from `seed` (see `init_weights`).
    """
    device = torch.device(device) if device is not None else default_device()
    cuda_bridge.install()
    tconfig = transformer_config(args, device=device)
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(False, vp_stage=vp_stage)
    backend = "te" if tconfig.transformer_impl == "transformer_engine" else "sdpa"
    meta = device.type == "meta"
    if backend == "sdpa" and not meta:
        heads = {(s.num_query_heads // args.tp, s.num_kv_heads // args.tp) for s in args.layers}
        check_kernel(
            args.model.sdpa_kernel,
            heads,
            args.model.d_head,
            args.model.seq_length,
            device,
            args.dtype,
        )
    fused = {"loss_chunk_rows": args.model.loss_chunk_rows} if args.model.fused_loss else {}
    num_layers = get_num_layers_to_build(tconfig, vp_stage=vp_stage)
    with torch.device("meta") if meta else contextlib.nullcontext():
        model = (FusedLossGPTModel if fused else GPTModel)(
            config=tconfig,
            transformer_layer_spec=block_spec(backend, args.model, num_layers),
            vocab_size=args.padded_vocab_size,
            max_sequence_length=args.model.seq_length,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=args.model.tie_embeddings,
            position_embedding_type="rope",
            rotary_base=args.model.rope_theta,
            vp_stage=vp_stage,
            **fused,
        )
    if meta:
        return model
    # Megatron leaves torch's norms on the default device in fp32; Megatron-LM moves and casts
    # the whole model after the build (model.cuda(), Float16Module) just like this.
    model.to(device=device, dtype=tconfig.params_dtype)
    init_weights(model, seed)
    return model


def build_model_chunks(
    args: ModelArgs, *, seed: int, device: torch.device | str | None = None
) -> list[GPTModel]:
    """All model chunks of this rank: one, or one per virtual pipeline stage of the layout."""
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    if vpp is None:
        return [build_model(args, seed=seed, device=device)]
    return [build_model(args, seed=seed, vp_stage=i, device=device) for i in range(vpp)]


def global_named_parameters(model: GPTModel) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """Parameters under the names they have in the whole model at TP=1, PP=1.

    Layer indices are global; a tied output head on the last stage is named as the embedding.
    """
    tied = model.share_embeddings_and_output_weights
    shared = model.shared_embedding_or_output_weight() if tied else None
    for name, param in model.named_parameters():
        if name.startswith("decoder.layers."):
            _, _, index, rest = name.split(".", 3)
            layer = model.decoder.layers[int(index)]
            name = f"decoder.layers.{layer.layer_number - 1}.{rest}"
        elif param is shared:
            name = "embedding.word_embeddings.weight"
        yield name, param


def init_weights(model: GPTModel, seed: int) -> None:
    """Draw every parameter from a CPU generator keyed by (seed, global name); this rank keeps
    its shard. Norm gains start at 1. `model.init=megatron`: N(0, std), output projections
    N(0, std/sqrt(2L)). `model.init=olmo` (OLMo-2): every weight, embedding and head included,
    truncated normal(0, std) cut at +-3 std, no depth scaling."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    std = model.config.init_method_std
    olmo = model.config.init == "olmo"
    scaled_std = std if olmo else std / math.sqrt(2 * model.config.num_layers)
    with torch.no_grad():
        for name, param in global_named_parameters(model):
            if param.dim() == 1:  # every 1-D parameter of this architecture is a norm's gain
                param.fill_(1.0)
                continue
            scaled = name.endswith(("linear_proj.weight", "linear_fc2.weight"))
            sigma = scaled_std if scaled else std
            parallel = getattr(param, "tensor_model_parallel", False)
            dim = param.partition_dim if parallel else 0
            full_shape = list(param.shape)
            full_shape[dim] *= tp if parallel else 1
            generator = torch.Generator().manual_seed(_name_seed(seed, name))
            full = torch.empty(full_shape, dtype=torch.float32)
            if olmo:
                torch.nn.init.trunc_normal_(
                    full, 0.0, sigma, -3 * sigma, 3 * sigma, generator=generator
                )
            else:
                full.normal_(0.0, sigma, generator=generator)
            if parallel:
                chunks = full.chunk(tp * param.partition_stride, dim=dim)
                full = torch.cat(chunks[rank::tp], dim=dim)
            param.copy_(full)


def _name_seed(seed: int, name: str) -> int:
    """A 63-bit seed of its own for each (seed, parameter name)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def trainable_parameter_count(chunks: list[GPTModel]) -> int:
    """Trainable parameters held by these chunks, each shared tensor counted once."""
    seen: dict[int, int] = {}
    for chunk in chunks:
        for param in chunk.parameters():
            if param.requires_grad:
                seen[id(param)] = param.numel()
    return sum(seen.values())
