"""`python -m lws_megatron.describe CONFIG... [key=value ...]`: per-layer shapes, budgets, plots."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lws_megatron import budget, shapes
from lws_megatron.cli import add_configs, configs_and_overrides
from lws_megatron.cli import parser as make_parser
from lws_megatron.config import Config, config_name, load_config
from lws_megatron.errors import UserError, cli_entry
from lws_megatron.fileio import atomic_output, ensure_dir


def describe_json(name: str, config: Config, tp: int) -> dict:
    s = config.summary(tp)
    return {
        "config": name,
        "tp": tp,
        "d_model": config.model.d_model,
        "d_head": config.model.d_head,
        "padded_vocab_size": shapes.padded_vocab_size(config.model, tp),
        "ffn_knots": list(config.lws.ffn_knots),
        "attn_knots": list(config.lws.attn_knots),
        "layers": [
            {
                "index": i,
                "ffn_hidden_size": layer.ffn_hidden_size,
                "num_query_heads": layer.num_query_heads,
                "num_kv_heads": layer.num_kv_heads,
                "params": params,
                "flops_per_token": flops,
            }
            for i, (layer, params, flops) in enumerate(zip(s.layers, s.layer_params, s.layer_flops))
        ],
        "total_params": s.total_params,
        "embedding_params": s.embedding_params,
        "non_embedding_params": s.non_embedding_params,
        "flops_per_token": s.flops_per_token,
        "tp_adjustments": [
            {"layer": a.layer, "heads_before": a.heads_before, "heads_after": a.heads_after}
            for a in shapes.tp_adjustments(config.lws, config.model, tp)
        ],
    }


def _fmt(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def render_text(reports: list[dict]) -> str:
    """One block of columns per config, side by side, then the totals."""
    col = 44
    depth = max(len(r["layers"]) for r in reports)
    lines = ["layer  " + "".join(f"{r['config']:<{col}}" for r in reports)]
    lines.append(
        "       "
        + "".join(
            f"{'ffn':>6} {'q':>3} {'kv':>3} {'params':>9} {'share':>6} {'GFLOP/tok':>10}  "
            for _ in reports
        )
    )
    for i in range(depth):
        row = f"{i:>5}  "
        for r in reports:
            if i < len(r["layers"]):
                layer = r["layers"][i]
                share = layer["params"] / r["total_params"]
                row += (
                    f"{layer['ffn_hidden_size']:>6} {layer['num_query_heads']:>3} "
                    f"{layer['num_kv_heads']:>3} {_fmt(layer['params']):>9} {share:>6.1%} "
                    f"{layer['flops_per_token'] / 1e9:>10.4f}  "
                )
            else:
                row += " " * col
        lines.append(row.rstrip())
    for label, key in (
        ("total params", "total_params"),
        ("without input embedding", "non_embedding_params"),
        ("training FLOPs per token", "flops_per_token"),
    ):
        lines.append(f"{label:<26}" + "".join(f"{r[key]:>18,}" for r in reports))
    for r in reports:
        for a in r["tp_adjustments"]:
            lines.append(
                f"{r['config']}: layer {a['layer']} query heads {a['heads_before']} -> "
                f"{a['heads_after']} (TP-aware rounding for TP={r['tp']})"
            )
    return "\n".join(lines)


def plot_profiles(
    reports: list[dict], path: str, colors: dict[str, str] | None = None, ncols: int | None = None
) -> None:
    """One panel per config: attention and FFN parameters per layer, labelled with widths.

    `colors` maps a config name to its colour, so that a report can keep one colour per
    profile across figures (attention light, FFN solid); `ncols` wraps many panels into rows.
    Missing parent directories are created; the file appears whole or not at all.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.backend_bases import FigureCanvasBase

    if str(path).endswith("/") or Path(path).name in ("", ".", ".."):
        example = Path(path) / "crown.png"
        raise UserError(f"{path}: names a directory; name an image file, e.g. {example}")
    image_format = Path(path).suffix.lstrip(".").lower() or matplotlib.rcParams["savefig.format"]
    if image_format not in FigureCanvasBase.get_supported_filetypes():
        raise UserError(
            f"{path}: cannot write .{image_format} images; name a .png, .svg or .pdf file"
        )
    ensure_dir(Path(path).parent)

    n = len(reports)
    cols = min(ncols or n, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(4.2 * cols, 4.2 * rows), sharey=True, squeeze=False
    )
    top = max(layer["params"] for r in reports for layer in r["layers"]) / 1e6
    for ax, r in zip(axes.flat, reports):
        _draw_profile(ax, r, colors[r["config"]] if colors else None, top)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for row in axes:
        row[0].set_ylabel("parameters per layer (millions)")
    axes[0][0].legend(
        loc="upper left", fontsize=7, title="labels: FFN width  query/KV heads", title_fontsize=6
    )
    fig.tight_layout()
    try:
        with atomic_output(path) as tmp:
            fig.savefig(tmp, dpi=150, format=image_format)
    except OSError as err:  # what atomic_output does not name (a filesystem without files)
        raise UserError(
            f"{path}: cannot write the image there ({err.strerror}); choose another path"
        ) from None
    finally:
        plt.close(fig)


def _draw_profile(ax, r: dict, color: str | None, top: float) -> None:
    """One config's panel: attention + norms and FFN parameters per layer, with their widths."""
    from matplotlib.ticker import MaxNLocator

    idx = [layer["index"] for layer in r["layers"]]
    ffn = [layer["params"] * _ffn_share(r, layer) / 1e6 for layer in r["layers"]]
    rest = [layer["params"] / 1e6 - f for layer, f in zip(r["layers"], ffn)]
    ax.bar(
        idx,
        rest,
        color=color or "#4C72B0",
        alpha=0.4 if color else 1.0,
        label="attention + norms",
    )
    ax.bar(idx, ffn, bottom=rest, color=color or "#DD8452", label="FFN")
    for layer, height in zip(r["layers"], [a + f for a, f in zip(rest, ffn)]):
        ax.text(
            layer["index"],
            height + top * 0.01,
            f"{layer['ffn_hidden_size']}  {layer['num_query_heads']}/{layer['num_kv_heads']}",
            ha="center",
            va="bottom",
            fontsize=6,
            rotation=90,
        )
    ax.set_title(
        f"{r['config']}  ({r['total_params'] / 1e6:.1f}M params)",
        fontsize=9,
        color=color or "black",
    )
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(0, top * 1.35)


def _ffn_share(report: dict, layer: dict) -> float:
    return 3 * report["d_model"] * layer["ffn_hidden_size"] / layer["params"]


def main(argv: list[str] | None = None) -> int:
    parser = make_parser("python -m lws_megatron.describe", __doc__)
    add_configs(parser, many=True)
    parser.add_argument("--tp", type=int, default=None, help="tensor-parallel size to check")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--plot", metavar="FILE.png", help="draw the per-layer profile")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--match-params", metavar="N", help="rescale knots to N parameters (180M)")
    group.add_argument("--match-flops", metavar="N", help="rescale knots to N FLOPs per token")
    args = parser.parse_intermixed_args(argv)
    return run(args)


@cli_entry
def run(args: argparse.Namespace) -> int:
    paths, overrides = configs_and_overrides(
        args, "python -m lws_megatron.describe configs/paper/crown-18l.yaml"
    )
    if args.tp is not None and args.tp < 1:
        raise UserError(f"--tp {args.tp}: the tensor-parallel size must be at least 1")
    if args.plot is not None and not args.plot.strip():
        raise UserError("--plot '' names no file; name an image file, e.g. --plot crown.png")
    target = _budget_target(args)
    reports = []
    for path in paths:
        try:
            reports.append(_describe_one(path, overrides, args, target))
        except UserError as err:
            message = str(err)
            raise UserError(message if message.startswith(path) else f"{path}: {message}") from None
    if args.plot is not None:
        plot_profiles(reports, args.plot)
    if args.json:
        print(json.dumps(reports[0] if len(reports) == 1 else reports, indent=1))
    else:
        print(render_text(reports))
    return 0


def _budget_target(args: argparse.Namespace) -> tuple[str, int] | None:
    for metric, amount in (("params", args.match_params), ("flops", args.match_flops)):
        if amount is not None:
            try:
                return metric, budget.parse_amount(amount)
            except UserError as err:
                raise UserError(f"--match-{metric}: {err}") from None
    return None


def _describe_one(
    path: str, overrides: list[str], args: argparse.Namespace, budget_target: tuple[str, int] | None
) -> dict:
    config = load_config(path, overrides)
    tp = config.parallel.tp if args.tp is None else args.tp
    if budget_target is not None:
        metric, target = budget_target
        match = budget.match_budget(config.lws, config.model, target, metric, tp)
        config.lws = match.profile
        print(
            f"{config_name(path)}: lws.ffn_knots={list(match.profile.ffn_knots)} "
            f"lws.attn_knots={list(match.profile.attn_knots)} gives {match.achieved:,} "
            f"{metric} ({match.error:+.3%} from {target:,})",
            file=sys.stderr,
        )
    return describe_json(config_name(path), config, tp)


if __name__ == "__main__":
    sys.exit(main())
