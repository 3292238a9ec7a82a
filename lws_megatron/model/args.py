"""What the model package builds from: the model section, per-layer shapes and the split.

Nothing about the run (seed, precision policy, compile mode, batch sizes) reaches the builders
except as these few resolved values, so the model can be built the same way by training, the
benchmark, the planner's calibration and the tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lws_megatron import shapes
from lws_megatron.config import Config, ModelConfig
from lws_megatron.model.parallel import check_layout
from lws_megatron.planner.memory import recomputed_layers, sequence_parallel


@dataclass(frozen=True)
class ModelArgs:
    model: ModelConfig
    layers: tuple[shapes.LayerShape, ...]  # every layer's shape, in global layer order
    padded_vocab_size: int
    tp: int = 1
    pp: int = 1
    layout: str | None = None  # Megatron's pipeline_model_parallel_layout; None: even split
    dtype: torch.dtype = torch.float32  # compute dtype of the matrix multiplies
    params_dtype: torch.dtype = torch.float32  # of the weights; below `dtype`: autocast
    fused_kernels: bool = False  # Megatron's jit-fused SwiGLU and cross-entropy
    sequence_parallel: bool = False
    recompute: str = "none"  # parallel.recompute
    recomputed_layers: tuple[int, ...] = ()  # 0-based global layer numbers it applies to

    @classmethod
    def from_config(
        cls,
        config: Config,
        *,
        layout: str | None,
        tp: int | None = None,
        dtype: torch.dtype = torch.float32,
        params_dtype: torch.dtype = torch.float32,
        fused_kernels: bool = False,
    ) -> ModelArgs:
        """The model of `config` at `tp` (default parallel.tp) and a resolved `layout`."""
        tp = config.parallel.tp if tp is None else tp
        pp = config.parallel.pp
        return cls(
            model=config.model,
            layers=config.summary(tp).layers,
            padded_vocab_size=shapes.padded_vocab_size(config.model, tp),
            tp=tp,
            pp=pp,
            layout=check_layout(config.model.num_layers, pp, layout),
            dtype=dtype,
            params_dtype=params_dtype,
            fused_kernels=fused_kernels,
            sequence_parallel=sequence_parallel(config, tp),
            recompute=config.parallel.recompute,
            recomputed_layers=recomputed_layers(config),
        )

    @property
    def autocast_dtype(self) -> torch.dtype:
        """What the forward runs under autocast to: fp32 (off) when the weights are the
        compute dtype already."""
        return self.dtype if self.params_dtype != self.dtype else torch.float32
