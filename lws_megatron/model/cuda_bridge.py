"""Megatron-Core (0.16-0.19) without CUDA: where it assumes a GPU, bridged for CPU runs on gloo.

`install()` does nothing when CUDA is available. Without CUDA it rebinds the name `torch` inside
the Megatron modules listed in `BRIDGED_MODULES` to `_CPU_TORCH`, which is torch itself except
for the CUDA calls below, wraps one Megatron method, and gives Megatron's CUDA RNG
bookkeeping (`_bridge_cuda_rng`) an empty state. Nothing outside those modules changes, so
other libraries in the process still see torch's own behaviour.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import types
from typing import Any, Callable

import torch
from megatron.core.models.common.language_module.language_module import LanguageModule


class _CpuCuda:
    """`torch.cuda` as the bridged modules see it: device queries answer "cpu"."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device() -> torch.device:
        return torch.device("cpu")

    @staticmethod
    def synchronize(device: Any = None) -> None:
        """CPU ops are synchronous; there is no stream to wait for."""

    @staticmethod
    def current_stream(device: Any = None) -> "_CpuStream":
        return _CpuStream()


class _CpuStream:
    """The one CPU "stream": work is already ordered, so every wait is immediate."""

    def wait_event(self, event: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass


class _CpuTorch(types.ModuleType):
    """`torch` as the bridged modules see it: `torch.cuda` bridged, `device="cuda"` made CPU."""

    cuda = _CpuCuda()

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def zeros(*size: Any, device: Any = None, **kwargs: Any) -> torch.Tensor:
        if device is not None and torch.device(device).type == "cuda":
            device = "cpu"
        return torch.zeros(*size, device=device, **kwargs)


_CPU_TORCH = _CpuTorch("torch")

# Module -> the Megatron functions in it that reach CUDA on every CPU step.
BRIDGED_MODULES = {
    # RotaryEmbedding.get_emb moves inv_freq to torch.cuda.current_device() on every forward.
    "megatron.core.models.common.embeddings.rotary_pos_embedding": "RotaryEmbedding.get_emb",
    # P2PCommunicator._communicate_shapes/_communicate allocate receive buffers on
    # torch.cuda.current_device() and call torch.cuda.synchronize() after batched send/recv.
    "megatron.core.pipeline_parallel.p2p_communication": "P2PCommunicator._communicate",
    # forward_backward_no_pipelining and both pipelining schedules count tokens in
    # torch.zeros([], dtype=torch.int, device="cuda").
    "megatron.core.pipeline_parallel.schedules": "forward_backward_*",
    # DistributedDataParallel's gradient buckets are allocated on torch.cuda.current_device();
    # from 0.19 each bucket group's start_grad_sync waits on torch.cuda.current_stream().
    "megatron.core.distributed.param_and_grad_buffer": "_ParamAndGradBuffer.__init__",
    # Sequence parallelism: the all-gathers and reduce-scatters along the sequence allocate
    # their outputs on torch.cuda.current_device(), in the region mappings, in the linear
    # layers' backward and in the global buffer the linear layers gather their input into.
    "megatron.core.tensor_parallel.mappings": "_gather_along_first_dim, _reduce_scatter_*",
    "megatron.core.tensor_parallel.layers": "LinearWithGradAccumulationAndAsyncCommunication",
    "megatron.core.utils": "GlobalMemoryBuffer.get_tensor",
}

_installed = False


def install() -> None:
    """Bridge Megatron-Core's CUDA assumptions when CUDA is absent; idempotent, inert with CUDA."""
    global _installed
    if _installed or torch.cuda.is_available():
        return
    for name in BRIDGED_MODULES:
        importlib.import_module(name).torch = _CPU_TORCH
    # LanguageModule.setup_embeddings_and_output_layer copies a tied embedding split over
    # pipeline stages with `weight.data.cuda()` before the all-reduce that equalises it.
    LanguageModule.setup_embeddings_and_output_layer = _tensor_cuda_is_identity(
        LanguageModule.setup_embeddings_and_output_layer
    )
    _bridge_cuda_rng()
    _installed = True


def _bridge_cuda_rng() -> None:
    """Recompute (`tensor_parallel.checkpoint`) saves and restores the CUDA generator's state
    around a layer's second forward, and sequence parallelism forks the model-parallel CUDA
    RNG tracker around the embedding and the layers. Without CUDA there is no such generator:
    its state is empty and a fork changes nothing. The CPU generator is still saved and
    restored by the checkpoint, as on a GPU."""
    from megatron.core.tensor_parallel import random

    random._get_cuda_rng_state = lambda *args, **kwargs: torch.empty(0, dtype=torch.uint8)
    random._set_cuda_rng_state = lambda *args, **kwargs: None
    random.CudaRNGStatesTracker.fork = lambda self, *args, **kwargs: contextlib.nullcontext()


def _tensor_cuda_is_identity(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run `method` with `Tensor.cuda()` returning the tensor itself (it stays on the CPU)."""

    @functools.wraps(method)
    def bridged(*args: Any, **kwargs: Any) -> Any:
        original = torch.Tensor.cuda
        torch.Tensor.cuda = lambda self, *a, **k: self
        try:
            return method(*args, **kwargs)
        finally:
            torch.Tensor.cuda = original

    return bridged
