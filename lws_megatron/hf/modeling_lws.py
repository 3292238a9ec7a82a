"""The LWS decoder in plain PyTorch, computing what the Megatron-Core model computes.

Shipped inside every LWS export dir (loaded with `trust_remote_code=True`), so it depends on
torch and transformers only. Each layer has its own FFN width and head counts. The block
follows Megatron's: RMSNorm in fp32 with gain, q/k/v projections, QK-norm before RoPE, RoPE
on the whole head with the two halves rotated (Megatron's `rotary_interleaved=False`), causal
GQA attention via SDPA with scale 1/sqrt(d_head) (eager where `output_attentions` asks for
the probabilities), SwiGLU (silu(gate) * up) without biases; pre norm (`x + f(norm(x))`) or
OLMo-2's post norm (`x + norm(f(x))`), a final norm, then the head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_lws import LWSConfig


class RMSNorm(nn.Module):
    """RMS over the last `dims` dimensions (2 for full QK-norm's heads x d_head)."""

    def __init__(self, shape: tuple[int, ...], eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(shape))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(-self.weight.dim(), 0))
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.square().mean(dim=dims, keepdim=True) + self.eps)
        return (x * self.weight.float()).to(dtype)


def rotate(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE on [b, heads, s, d] at [b, s] positions, halves rotated, as Megatron applies it."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=x.device) / d))
    freqs = positions.float()[..., None] * inv_freq  # [b, s, d/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [b, 1, s, d]
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * emb.cos().to(x.dtype) + rotated * emb.sin().to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: LWSConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.heads = config.layer_num_attention_heads[layer]
        self.kv_heads = config.layer_num_key_value_heads[layer]
        self.d_head, self.theta = config.head_dim, config.rope_theta
        width, eps = config.hidden_size, config.rms_norm_eps
        self.q_proj = nn.Linear(width, self.heads * self.d_head, bias=False)
        self.k_proj = nn.Linear(width, self.kv_heads * self.d_head, bias=False)
        self.v_proj = nn.Linear(width, self.kv_heads * self.d_head, bias=False)
        self.o_proj = nn.Linear(self.heads * self.d_head, width, bias=False)
        self.q_norm = self.k_norm = None
        if config.qk_norm == "head":
            self.q_norm = RMSNorm((self.d_head,), eps)
            self.k_norm = RMSNorm((self.d_head,), eps)
        elif config.qk_norm == "full":
            self.q_norm = RMSNorm((self.heads, self.d_head), eps)
            self.k_norm = RMSNorm((self.kv_heads, self.d_head), eps)

    def forward(self, x, positions, mask, cache: Cache | None, weights: bool = False):
        """The attention output, and its [b, heads, s, keys] probabilities when `weights`."""
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.d_head)
        k = self.k_proj(x).view(b, s, self.kv_heads, self.d_head)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.d_head)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        q, k = rotate(q, positions, self.theta), rotate(k, positions, self.theta)
        if cache is not None:
            k, v = cache.update(k, v, self.layer)
        probs = None
        if weights:  # eager: SDPA does not return the probabilities
            k, v = (t.repeat_interleave(self.heads // self.kv_heads, dim=1) for t in (k, v))
            if mask is None:
                mask = torch.ones(s, k.shape[2], dtype=torch.bool, device=x.device).tril(
                    k.shape[2] - s
                )
            scores = (q @ k.transpose(-1, -2)) * self.d_head**-0.5
            probs = scores.masked_fill(~mask, float("-inf")).softmax(-1, dtype=torch.float32)
            out = probs.to(q.dtype) @ v
        else:
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                is_causal=mask is None,
                enable_gqa=self.kv_heads != self.heads,
            )
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.heads * self.d_head)), probs


class MLP(nn.Module):
    def __init__(self, config: LWSConfig, layer: int):
        super().__init__()
        width, ffn = config.hidden_size, config.intermediate_sizes[layer]
        self.gate_proj = nn.Linear(width, ffn, bias=False)
        self.up_proj = nn.Linear(width, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, width, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: LWSConfig, layer: int):
        super().__init__()
        self.post = config.norm_placement == "post"
        self.self_attn = Attention(config, layer)
        self.mlp = MLP(config, layer)
        names = (
            ("post_attention_norm", "post_mlp_norm")
            if self.post
            else ("input_norm", "pre_mlp_norm")
        )
        self.attn_norm_name, self.mlp_norm_name = names
        for name in names:
            self.add_module(name, RMSNorm((config.hidden_size,), config.rms_norm_eps))

    def forward(self, x, positions, mask, cache, weights: bool = False):
        attn_norm, mlp_norm = getattr(self, self.attn_norm_name), getattr(self, self.mlp_norm_name)
        if self.post:
            out, probs = self.self_attn(x, positions, mask, cache, weights)
            x = x + attn_norm(out)
            return x + mlp_norm(self.mlp(x)), probs
        out, probs = self.self_attn(attn_norm(x), positions, mask, cache, weights)
        x = x + out
        return x + self.mlp(mlp_norm(x)), probs


class LWSPreTrainedModel(PreTrainedModel):
    config_class = LWSConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module):
        """Only for models built from a config (an export always loads every weight)."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)


class LWSModel(LWSPreTrainedModel):
    def __init__(self, config: LWSConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm((config.hidden_size,), config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids,
        attention_mask=None,
        position_ids=None,
        cache=None,
        output_hidden_states=None,
        output_attentions=None,
    ):
        """As transformers' decoders: `hidden_states` holds the embeddings and every layer's
        output, the last one after the final norm; `attentions` every layer's probabilities."""
        b, s = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = (torch.arange(s, device=input_ids.device) + past).expand(b, s)
        x = self.embed_tokens(input_ids)
        mask = _mask(attention_mask, b, s, past, input_ids.device)
        hidden, attentions = [], []
        for layer in self.layers:
            hidden.append(x)
            x, probs = layer(x, position_ids, mask, cache, bool(output_attentions))
            attentions.append(probs)
        x = self.norm(x)
        return BaseModelOutputWithPast(
            last_hidden_state=x,
            cache=cache,
            hidden_states=(*hidden, x) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
        )


def _mask(attention_mask, b: int, s: int, past: int, device) -> torch.Tensor | None:
    """None (plain causal SDPA) unless there is a cache or padding: then [b, 1, s, past + s]."""
    padded = attention_mask is not None and not bool(attention_mask.all())
    if past == 0 and not padded:
        return None
    keys = torch.arange(past + s, device=device)[None, :]
    rows = (torch.arange(s, device=device) + past)[:, None]
    mask = (keys <= rows)[None, None].expand(b, 1, s, past + s)
    if padded:
        mask = mask & attention_mask[:, None, None, -(past + s) :].bool()
        # A padding query would attend to nothing (NaN); it attends to itself instead.
        mask = mask | (keys == rows)[None, None]
    return mask


class LWSForCausalLM(LWSPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LWSConfig):
        super().__init__(config)
        self.model = LWSModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        labels=None,
        use_cache=None,
        past_key_values=None,
        logits_to_keep=0,
        output_hidden_states=None,
        output_attentions=None,
        **kwargs,
    ):
        cache = cache if cache is not None else past_key_values
        if use_cache and cache is None:
            cache = DynamicCache()
        config = self.config
        decoded = self.model(
            input_ids,
            attention_mask,
            position_ids,
            cache,
            _default(output_hidden_states, config.output_hidden_states),
            _default(output_attentions, config.output_attentions),
        )
        hidden = decoded.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=cache,
            hidden_states=decoded.hidden_states,
            attentions=decoded.attentions,
        )


def _default(value, configured):
    return configured if value is None else value
