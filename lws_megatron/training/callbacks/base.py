"""The callback interface and its registry."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from lws_megatron.errors import UserError

if TYPE_CHECKING:
    from lws_megatron.training.step_stats import Interval
    from lws_megatron.training.trainer import Trainer


class Callback:
    """Hooks the trainer calls, in the order of `priority` (lower first); all optional.

    The loop reads the device only at some steps (`Trainer.read_due`: log, evaluation and
    checkpoint steps, the last one); `on_interval_end` runs there, with the steps since the
    previous read and what the step is due for (`interval.due`, computed once by the
    trainer). A metric of a step is recorded with `trainer.record_metric`. A callback that
    wants the run to end calls `trainer.request_stop`, and the checkpoint callback (last)
    saves before the loop ends. `before_step` must not read the device.
    """

    priority = 50

    def on_train_start(self, trainer: Trainer) -> None:
        pass

    def before_step(self, trainer: Trainer) -> None:
        pass

    def on_interval_end(self, trainer: Trainer, interval: Interval) -> None:
        pass

    def on_train_end(self, trainer: Trainer) -> None:
        pass


_REGISTRY: dict[str, tuple[type[Callback], bool]] = {}


def registered(name: str, default: bool = False) -> Callable[[type[Callback]], type[Callback]]:
    """Class decorator: make a callback available as `name` (always on when `default`)."""

    def add(cls: type[Callback]) -> type[Callback]:
        _REGISTRY[name] = (cls, default)
        return cls

    return add


def build_callbacks(extra: list[str]) -> list[Callback]:
    """The default callbacks plus those named in `train.callbacks`, sorted by priority."""
    unknown = [name for name in extra if name not in _REGISTRY]
    if unknown:
        optional = sorted(n for n, (_, default) in _REGISTRY.items() if not default)
        raise UserError(
            f"train.callbacks: unknown callback {unknown[0]!r}; available: {', '.join(optional)}"
        )
    names = [n for n, (_, default) in _REGISTRY.items() if default]
    names += [n for n in dict.fromkeys(extra) if n not in names]
    return sorted((_REGISTRY[n][0]() for n in names), key=lambda cb: cb.priority)
