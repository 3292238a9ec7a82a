"""Pipeline layouts against the model: checked without touching any process group.

A layout that doesn't match the model surfaces as a one-line UserError here, before Megatron
would fail an assertion or hang. Process groups are the training runtime's business
(`lws_megatron.training.distributed`).
"""

from __future__ import annotations

from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout

from lws_megatron.errors import UserError


def check_layout(num_layers: int, pp: int, layout: str | None) -> str | None:
    """`layout` (a Megatron pipeline_model_parallel_layout, or None for the even split) if it
    fits `num_layers` over `pp` stages; UserError otherwise."""
    layout = (layout or "").strip() or None
    if layout is None:
        if num_layers % pp:
            raise UserError(
                f"model.num_layers={num_layers} doesn't split evenly over parallel.pp={pp}; set "
                f"parallel.pipeline_layout (e.g. {example_layout(num_layers, pp)!r}) or 'auto'"
            )
        return None
    try:
        PipelineParallelLayerLayout(layout, pp).validate_layer_layout(num_layers, None)
    except (AssertionError, ValueError, KeyError, NotImplementedError) as err:
        raise UserError(
            f"parallel.pipeline_layout={layout!r} doesn't fit parallel.pp={pp} and "
            f"model.num_layers={num_layers} ({err}); write one stage per '|' with E first, L "
            f"last and {num_layers} t's, e.g. {example_layout(num_layers, pp)!r}"
        ) from None
    return layout


def example_layout(num_layers: int, pp: int) -> str:
    """A valid layout with the layers spread as evenly as they go (earlier stages get more)."""
    sizes = [num_layers // pp + (i < num_layers % pp) for i in range(pp)]
    return "E" + "|".join(f"t*{s}" for s in sizes) + "L"


def virtual_pipeline_size(layout: str | None, pp: int) -> int | None:
    """Model chunks per pipeline rank a layout asks for (None: no virtual pipeline)."""
    if layout is None:
        return None
    vpp = PipelineParallelLayerLayout.get_num_stages_from_str(layout) // pp
    return vpp if vpp > 1 else None
