"""What every command line shares: help with defaults, and configs taken one way everywhere.

A command that takes configs takes them positionally or with `--config` (repeatable), mixed
freely with `key=value` overrides, so `pretrain.py --config A x=1`, `pretrain.py A x=1`,
`submit.py A`, `sweep.py --config A --config B` all read the same. Light on purpose: `--help`
never imports torch, Megatron, DeepSpeed or transformers.
"""

from __future__ import annotations

import argparse
import dataclasses
import textwrap
import time
import typing

from lws_megatron.errors import UserError


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written, and each option's default where it has a meaningful one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" in text
            or "default" in text
            or default is None
            or default is False
            or default == []
            or default == argparse.SUPPRESS
            or not (action.option_strings or action.nargs in ("?", "*"))
        ):
            return text
        return f"{text} (default: %(default)s)"


def parser(prog: str, doc: str | None, **options) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog=prog, description=doc, formatter_class=HelpFormatter, **options
    )


def add_configs(parser: argparse.ArgumentParser, many: bool = False) -> None:
    """CONFIG arguments, positional or --config, and key=value overrides."""
    parser.add_argument(
        "items",
        nargs="*",
        metavar="CONFIG|key=value",
        help=(
            "YAML configs, and dotted overrides applied to each"
            if many
            else "the YAML config, and dotted overrides"
        )
        + " (e.g. train.max_steps=50)",
    )
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="CONFIG",
        dest="configs",
        help="a YAML config, the same as giving it positionally"
        + (" (repeatable)" if many else ""),
    )


def configs_and_overrides(
    args: argparse.Namespace, example: str, exactly_one: bool = False
) -> tuple[list[str], list[str]]:
    """(config paths, overrides) from `add_configs`' arguments, refusing none (or several)."""
    configs = list(args.configs) + [item for item in args.items if "=" not in item]
    overrides = [item for item in args.items if "=" in item]
    if not configs:
        raise UserError(f"give a config, e.g. {example}")
    if exactly_one and len(configs) > 1:
        raise UserError(f"give exactly one config, got {len(configs)}: {' '.join(configs)}")
    return configs, overrides


def config_keys() -> str:
    """Every config key with its default, by section: the epilog of `pretrain.py --help`."""
    from lws_megatron.config import Config

    lines = ["config keys (section.key=default; override any as key=value):"]
    for section in dataclasses.fields(Config):
        values = section.default_factory()
        items = [f"{f.name}={_shown(getattr(values, f.name))}" for f in dataclasses.fields(values)]
        text = f"{section.name}: " + ", ".join(items)
        lines.append(textwrap.fill(text, 98, initial_indent="  ", subsequent_indent="      "))
    return "\n".join(lines)


def _shown(value: typing.Any) -> str:
    return repr(value) if value == "" else str(value).replace("'", "")


def duration(seconds: float) -> str:
    """42s, 3m 05s, 2h 07m."""
    seconds = max(0, round(seconds))
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


class Progress:
    """Banners for a sequence of runs: `[2/5] framed | ETA 6m 15s (2m 05s a run so far)`."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.seconds = total, 0, 0.0
        self._began: float | None = None

    def start(self, what: str) -> None:
        self._finish()
        self._began = time.monotonic()
        eta = ""
        if self.done:
            each = self.seconds / self.done
            left = each * (self.total - self.done)
            eta = f" | ETA {duration(left)} ({duration(each)} a run so far)"
        print(f"\n[{self.done + 1}/{self.total}] {what}{eta}", flush=True)

    def _finish(self) -> None:
        if self._began is not None:
            self.seconds += time.monotonic() - self._began
            self.done += 1
            self._began = None
