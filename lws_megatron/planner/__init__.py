"""Cost-aware pipeline stage planning for models whose layers differ in size (issue 6).

`costs` prices every block (layer, embedding, head; their bytes from `memory`), `partition`
finds the exact optimal contiguous split, `stages` turns it into a plan and Megatron's layout
string, and
`lws_megatron.calibration` (torch, imported only when asked) measures the real layers.
"""

from lws_megatron.planner.costs import CostModel, Timings, cost_model
from lws_megatron.planner.memory import PRECISIONS
from lws_megatron.planner.stages import (
    Plan,
    Split,
    Stage,
    parse_bytes,
    plan,
    plan_layout,
    stage_memory,
)

__all__ = [
    "PRECISIONS",
    "CostModel",
    "Plan",
    "Split",
    "Stage",
    "Timings",
    "cost_model",
    "parse_bytes",
    "plan",
    "plan_layout",
    "stage_memory",
]
