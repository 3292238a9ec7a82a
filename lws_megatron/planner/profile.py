"""Measured compute on the current device: per-shape calibration and direct per-stage timing.

The planner's only torch code, imported only for `plan --profile` and `plan --measure`. Blocks
are a plain PyTorch re-implementation of the LWS layer (RMSNorm, QK-norm, RoPE, causal GQA
attention, SwiGLU, no biases), the input embedding, and the head (final norm, output layer,
cross-entropy): enough to time the shapes, not a training model. Every timing is forward +
backward of one micro batch (train.micro_batch_size x model.seq_length), the fastest of
`repeats` runs after a warm-up (interference from other work only ever adds time), with
fp32 weights under bf16 autocast on CUDA as training runs, and attention on the kernel the
model will run (model.sdpa_kernel); a whole layer is timed whatever the TP size, since tensor
parallelism scales every layer alike.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lws_megatron.config import Config
from lws_megatron.model.attention import attend
from lws_megatron.planner.costs import Timings
from lws_megatron.shapes import LayerShape, padded_vocab_size

CACHE_FILE = (
    Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lws_megatron"
    / "layer_times.json"
)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name() -> str:
    """What the cache is keyed by: the GPU model, or the CPU model and torch's thread count."""
    if device().type == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines()
                 if ln.startswith("model name")]
        model = names[0] if names else model
    return f"cpu {model} x{torch.get_num_threads()} threads"


def layer_timings(config: Config, *, repeats: int = 5, cache: Path | None = None) -> Timings:
    """Seconds per distinct layer shape, the embedding and the head, cached per device and shape."""
    cache = cache or CACHE_FILE
    dims, train = config.dims, config.train
    prefix = (
        f"{device_name()}|{_precision()}|d_model={dims.d_model}|d_head={dims.d_head}|"
        f"seq={dims.seq_length}|micro_batch={train.micro_batch_size}|qk_norm={dims.qk_norm}|"
        f"sdpa={config.model.sdpa_kernel}|"
    )
    vocab = padded_vocab_size(dims, config.parallel.tp)
    shapes = sorted(set(config.summary().layers), key=str)
    keys = {s: prefix + f"ffn={s.ffn_hidden_size},q={s.num_query_heads},kv={s.num_kv_heads}"
            for s in shapes}
    keys["embedding"] = prefix + f"embedding vocab={vocab}"
    keys["output"] = prefix + f"output vocab={vocab}"
    known = json.loads(cache.read_text()) if cache.is_file() else {}
    missing = [block for block, key in keys.items() if key not in known]
    if missing:
        chunks = {
            block: _Chunk(config, [block] if isinstance(block, LayerShape) else [],
                          embedding=block == "embedding", output=block == "output")
            for block in missing
        }
        times = _fastest_times(chunks, repeats)
        known.update({keys[block]: times[block] for block in missing})
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(known, indent=1, sort_keys=True))
        tmp.replace(cache)
    return Timings(
        layers={s: known[keys[s]] for s in shapes},
        embedding=known[keys["embedding"]],
        output=known[keys["output"]],
    )


def time_splits(
    config: Config, splits: list[tuple[int, ...]], pp: int, *, repeats: int = 15,
) -> list[list[float]]:
    """Per split, per rank: seconds of forward + backward of its chunks, timed directly.

    The runs of all chunks of all splits alternate, so that drifts in the machine's speed
    fall on every split alike.
    """
    layers = config.summary().layers
    chunks = {}
    for s, bounds in enumerate(splits):
        last = len(bounds) - 2
        for c in range(last + 1):
            chunks[s, c] = _Chunk(config, layers[bounds[c]:bounds[c + 1]],
                                  embedding=c == 0, output=c == last)
    times = _fastest_times(chunks, repeats)
    result = []
    for s, bounds in enumerate(splits):
        ranks = [0.0] * pp
        for c in range(len(bounds) - 1):
            ranks[c % pp] += times[s, c]
        result.append(ranks)
    return result


def _precision() -> str:
    return "autocast-bf16" if device().type == "cuda" else "fp32"


def _fastest_times(chunks: dict, repeats: int) -> dict:
    runs = {key: [] for key in chunks}
    for chunk in chunks.values():
        chunk.step()  # warm-up
    for _ in range(repeats):
        for key, chunk in chunks.items():
            runs[key].append(chunk.timed_step())
    return {key: min(r) for key, r in runs.items()}


class _Layer(nn.Module):
    def __init__(self, shape: LayerShape, d: int, d_head: int, qk_norm: bool, eps: float,
                 kernel: str):
        super().__init__()
        self.heads, self.kv, self.d_head = shape.num_query_heads, shape.num_kv_heads, d_head
        self.kernel = kernel
        self.norm1, self.norm2 = nn.RMSNorm(d, eps=eps), nn.RMSNorm(d, eps=eps)
        self.qkv = nn.Linear(d, (self.heads + 2 * self.kv) * d_head, bias=False)
        self.q_norm = nn.RMSNorm(d_head, eps=eps) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(d_head, eps=eps) if qk_norm else nn.Identity()
        self.proj = nn.Linear(self.heads * d_head, d, bias=False)
        self.fc1 = nn.Linear(d, 2 * shape.ffn_hidden_size, bias=False)
        self.fc2 = nn.Linear(shape.ffn_hidden_size, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(
            [self.heads * self.d_head, self.kv * self.d_head, self.kv * self.d_head], dim=-1
        )
        q = _rope(self.q_norm(q.view(b, s, self.heads, self.d_head)), cos, sin)
        k = _rope(self.k_norm(k.view(b, s, self.kv, self.d_head)), cos, sin)
        v = v.view(b, s, self.kv, self.d_head).transpose(1, 2)
        o = attend(q, k, v, kernel=self.kernel)
        x = x + self.proj(o.transpose(1, 2).reshape(b, s, -1))
        gate, up = self.fc1(self.norm2(x)).chunk(2, dim=-1)
        return x + self.fc2(F.silu(gate) * up)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x = x.transpose(1, 2)
    a, b = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-b, a], dim=-1) * sin


class _Chunk:
    """A run of blocks as one pipeline stage sees them: hidden states in, gradients back."""

    def __init__(self, config: Config, shapes: list[LayerShape], *, embedding: bool,
                 output: bool):
        m, dev = config.model, device()
        vocab = padded_vocab_size(config.dims, config.parallel.tp)
        b, s = config.train.micro_batch_size, m.seq_length
        self.embedding = nn.Embedding(vocab, m.d_model) if embedding else None
        self.layers = nn.ModuleList(
            _Layer(shape, m.d_model, m.d_head, m.qk_norm != "none", m.norm_eps, m.sdpa_kernel)
            for shape in shapes
        )
        self.norm = nn.RMSNorm(m.d_model, eps=m.norm_eps) if output else None
        self.head = nn.Linear(m.d_model, vocab, bias=False) if output else None
        for module in (self.embedding, self.layers, self.norm, self.head):
            if module is not None:
                module.to(dev)
        inv = 1.0 / m.rope_theta ** (torch.arange(0, m.d_head, 2, device=dev) / m.d_head)
        angles = torch.outer(torch.arange(s, device=dev), inv).repeat(1, 2)
        self.cos, self.sin = angles.cos(), angles.sin()
        self.tokens = torch.randint(vocab, (b, s), device=dev)
        self.hidden = torch.randn(b, s, m.d_model, device=dev)
        self.grad = torch.randn_like(self.hidden)

    def step(self) -> None:
        with torch.autocast(device().type, dtype=torch.bfloat16,
                            enabled=device().type == "cuda"):
            if self.embedding is not None:
                x = self.embedding(self.tokens)
            else:
                x = self.hidden.detach().requires_grad_()
            for layer in self.layers:
                x = layer(x, self.cos, self.sin)
            if self.head is not None:
                logits = self.head(self.norm(x)).float()
                loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), self.tokens.view(-1))
        if self.head is not None:
            loss.backward()
        else:
            x.backward(self.grad.to(x.dtype))

    def timed_step(self) -> float:
        _sync()
        start = time.perf_counter()
        self.step()
        _sync()
        return time.perf_counter() - start


def _sync() -> None:
    if device().type == "cuda":
        torch.cuda.synchronize()
