"""`python -m lws_megatron.plan CONFIG --pp P [key=value ...]`: cost-aware pipeline stages.

Prints, per pipeline stage, the layers, the share of compute and the memory of the optimal
split beside Megatron's even split, their imbalance (slowest stage over the mean), and the
`parallel.pipeline_layout` to train with. The config's recomputation and sequence parallelism
are priced as training runs them; `--recompute auto --device-memory SIZE` picks, per stage,
the fewest layers to recompute (widest first) that fit, and prints the config lines to use.
"""

from __future__ import annotations

import argparse
import json
import sys

from lws_megatron.cli import add_configs, configs_and_overrides
from lws_megatron.cli import parser as make_parser
from lws_megatron.config import config_name, load_config
from lws_megatron.errors import UserError, cli_entry
from lws_megatron.planner import PRECISIONS, Plan, Stage, parse_bytes, plan
from lws_megatron.planner.costs import RECOMPUTE
from lws_megatron.planner.stages import format_bytes, imbalance, plan_recompute


def main(argv: list[str] | None = None) -> int:
    parser = make_parser("python -m lws_megatron.plan", __doc__)
    add_configs(parser)
    parser.add_argument("--pp", type=int, help="pipeline-parallel size (default parallel.pp)")
    parser.add_argument("--vpp", type=int, default=1, help="virtual stages per rank (interleaved)")
    parser.add_argument("--tp", type=int, help="tensor-parallel size (default parallel.tp)")
    parser.add_argument("--dp", type=int, default=1, help="data-parallel size (ZeRO sharding)")
    parser.add_argument("--zero", type=int, choices=(0, 1, 2), help="default zero.stage")
    parser.add_argument("--device-memory", metavar="SIZE", help="per-device limit, e.g. 80GB")
    parser.add_argument(
        "--precision",
        choices=["auto", *sorted(PRECISIONS)],
        help="byte accounting (default train.precision; auto: as on --device, bf16 on cuda)",
    )
    parser.add_argument(
        "--recompute",
        choices=[*RECOMPUTE, "auto"],
        help="activation recomputation (default parallel.recompute; auto: the fewest layers "
        "per stage that fit --device-memory)",
    )
    parser.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="whose kernels' saved activations to count (default cuda)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="cost layers by their measured time on this device (cached)",
    )
    parser.add_argument(
        "--measure", action="store_true", help="also time each stage of both splits on this device"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return run(parser.parse_intermixed_args(argv))


@cli_entry
def run(args: argparse.Namespace) -> int:
    paths, overrides = configs_and_overrides(
        args, "python -m lws_megatron.plan configs/paper/crown-18l.yaml --pp 2", exactly_one=True
    )
    auto = args.recompute == "auto"
    for key, value in (
        ("parallel.pp", args.pp),
        ("parallel.tp", args.tp),
        ("zero.stage", args.zero),
        ("parallel.recompute", None if auto else args.recompute),
    ):
        if value is not None:
            overrides.append(f"{key}={value}")
    config = load_config(paths[0], overrides)
    if auto and not args.device_memory:
        raise UserError("--recompute auto fits the stages to a memory limit; give --device-memory")
    options = {
        "dp": args.dp,
        "precision": args.precision,
        "device": args.device,
        "device_memory": parse_bytes(args.device_memory) if args.device_memory else None,
    }
    if auto:
        if args.vpp != 1:
            raise UserError("--recompute auto plans one chunk per pipeline rank; give --vpp 1")
        planner = plan_recompute
    else:
        planner, options["vpp"] = plan, args.vpp
    result = planner(config, **options)  # refuses bad sizes before any timing
    if args.profile or args.measure:
        from lws_megatron import calibration  # torch and Megatron: only when measuring

    if args.profile:
        result = planner(config, **options, timings=calibration.layer_timings(config))
    measured = None
    if args.measure:
        planned, even = calibration.time_splits(
            config, [result.planned.bounds, result.even.bounds], result.pp
        )
        measured = {
            "device": calibration.device_label(),
            "planned_seconds": planned,
            "even_seconds": even,
        }
    if args.json:
        report = {"config": config_name(paths[0]), **result.to_json()}
        if measured:
            report["measured"] = measured
        print(json.dumps(report, indent=1))
    else:
        print(render_text(config_name(paths[0]), result, measured))
    return 0


def render_text(name: str, p: Plan, measured: dict | None = None) -> str:
    """The two splits side by side, stage by stage, then the layout line."""
    sizes = f"PP={p.pp}" + (f" x VPP={p.vpp}" if p.vpp > 1 else "")
    limit = f", limit {format_bytes(p.device_memory)}" if p.device_memory else ""
    planned = "planned (optimal)" if p.proven else "planned (best found, not proven optimal)"
    even = "even split (Megatron default)" if p.even_is_megatron_default else "even split *"
    width = 44
    header = f"{'layers':<17}{'#':>3}{'compute':>9}{'memory':>12}"
    lines = [
        f"{name}: {sizes}, TP={p.tp}, DP={p.dp}, ZeRO-{p.zero}, {p.precision}, recompute "
        f"{p.recompute}, {p.micro_batches} micro batches/step{limit}; cost in {p.unit}",
        "",
        f"{'':<7}{planned:<{width}}{even}",
        f"{'stage':<7}{header}{'':<3}{header}",
    ]
    for a, b in zip(p.planned.stages, p.even.stages):
        row = f"{a.rank:<7}"
        for split, stage in ((p.planned, a), (p.even, b)):
            share = stage.cost / sum(s.cost for s in split.stages)
            over = " !" if p.device_memory and stage.memory_bytes > p.device_memory else ""
            row += (
                f"{_layers(stage):<17}{len(stage.layers):>3}{share:>9.1%}"
                f"{format_bytes(stage.memory_bytes):>12}{over:<3}"
            )
        lines.append(row.rstrip())
    lines.append(
        f"{'imbalance (slowest / mean)':<36}{p.planned.imbalance:>7.3f}"
        f"{'':<{width - 7}}{p.even.imbalance:>7.3f}"
    )
    if measured:
        lines += ["", f"measured forward+backward per micro batch on {measured['device']}:"]
        for r, (a, b) in enumerate(zip(measured["planned_seconds"], measured["even_seconds"])):
            lines.append(f"{r:<7}{a * 1e3:>33.1f} ms{'':<{width - 10}}{b * 1e3:>7.1f} ms")
        lines.append(
            f"{'imbalance':<36}{imbalance(measured['planned_seconds']):>7.3f}"
            f"{'':<{width - 7}}{imbalance(measured['even_seconds']):>7.3f}"
        )
    return "\n".join(lines + _footer(p))


def _footer(p: Plan) -> list[str]:
    """The notes under the table, then the config lines to train with."""
    lines = []
    if p.device_memory and any(s.memory_bytes > p.device_memory for s in p.even.stages):
        lines.append("! over the memory limit")
    if not p.even_is_megatron_default:
        lines.append(
            f"* {p.planned.bounds[-1]} layers do not divide into {p.pp * p.vpp} equal stages, "
            "which Megatron refuses without a layout; shown: counts as equal as possible"
        )
    lines.append("")
    if p.auto_recompute:
        lines.append(
            "recomputed (full, widest first): "
            + "; ".join(
                f"stage {s.rank}: {', '.join(map(str, s.recomputed)) or 'none'}"
                for s in p.planned.stages
            )
        )
        if p.recomputed:
            lines.append("parallel.recompute: full")
            lines.append(f"parallel.recompute_layers: {list(p.recomputed)}")
        else:
            lines.append("parallel.recompute: none")
    lines.append(f'parallel.pipeline_layout: "{p.planned.layout}"')
    return lines


def _layers(stage: Stage) -> str:
    """'E 0-5', '6-9 L', '0-2,9-11' for a rank with two virtual stages."""
    runs = [f"{c[0]}-{c[-1]}" if len(c) > 1 else f"{c[0]}" for c in stage.chunks if c]
    parts = (["E"] if stage.embedding else []) + [",".join(runs)] + (["L"] if stage.output else [])
    return " ".join(p for p in parts if p)


if __name__ == "__main__":
    sys.exit(main())
