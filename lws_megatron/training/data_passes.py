"""How many passes over its training data a run makes: read from the manifests, before training.

More than one pass repeats documents, which changes what a loss curve means; users should know
before the run, not from its curve.
"""

from __future__ import annotations

from lws_megatron.config import Config
from lws_megatron.dataset.manifest import manifest_path, read_manifest


def data_passes(
    config: Config, prefixes: list[str], weights: list[float] | None
) -> dict[str, float]:
    """Passes over each prefix's training split (the whole blend's when it has no weights)."""
    t = config.train
    read = t.max_steps * t.global_batch_size * config.model.seq_length
    held = {p: read_manifest(manifest_path(p)).splits["train"].tokens for p in prefixes}
    if weights is None:
        return {"+".join(prefixes): read / max(1, sum(held.values()))}
    total = sum(weights)
    return {p: read * w / total / max(1, held[p]) for p, w in zip(prefixes, weights)}


def passes_warning(config: Config, prefixes: list[str], weights: list[float] | None) -> str | None:
    passes = data_passes(config, prefixes, weights)
    if max(passes.values()) <= 1.0:
        return None
    t = config.train
    read = t.max_steps * t.global_batch_size * config.model.seq_length
    detail = ", ".join(f"{p}: {n:.2f}" for p, n in passes.items())
    return (
        f"warning: the run reads {read:,} training tokens (train.max_steps={t.max_steps} x "
        f"{t.global_batch_size} x {config.model.seq_length}), more than the training data "
        f"holds: passes over the data {detail}; documents will repeat"
    )
