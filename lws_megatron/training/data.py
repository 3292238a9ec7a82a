"""Training and validation batches from data_prep outputs, through Megatron-Core's GPTDataset.

`data.path` lists dataset prefixes written by `data_prep.preprocess` (optionally weighted,
Megatron style: ["0.7", "a", "0.3", "b"]); each has `PREFIX_train` and `PREFIX_valid` splits
and a manifest. Every dataset passes data_prep's integrity checks against the configured
tokenizer before a single sample is read.

Sample order is a pure function of the step: the global batch of step k is samples
[k*G, (k+1)*G) of the blended dataset, cut into data-parallel slices and then micro batches.
So the data position of a checkpoint is just its step, and every layout sees the same tokens.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.core import parallel_state as ps
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from data_prep.integrity import verify_dataset
from data_prep.manifest import manifest_path, read_manifest, split_prefix
from data_prep.tokenizer import Tokenizer, load_tokenizer
from lws_megatron.config import Config
from lws_megatron.errors import UserError
from lws_megatron.training.distributed import ParallelPlan


Batch = dict[str, torch.Tensor]  # tokens, labels: [b, s] int64; loss_mask: [b, s] float


@dataclass(frozen=True)
class Sources:
    prefixes: list[str]
    weights: list[float] | None
    tokenizer: Tokenizer
    valid_fingerprint: str


def parse_blend(paths: list[str]) -> tuple[list[str], list[float] | None]:
    """["a", "b"] -> (["a", "b"], None); ["0.7", "a", "0.3", "b"] -> weights [0.7, 0.3]."""
    if not paths:
        raise UserError("data.path is empty; give one or more dataset prefixes written by "
                        "python -m data_prep.preprocess")
    try:
        float(paths[0])
    except ValueError:
        return list(paths), None
    if len(paths) % 2:
        raise UserError(f"data.path {paths}: a weighted blend alternates weight and prefix")
    try:
        weights = [float(w) for w in paths[0::2]]
    except ValueError:
        raise UserError(f"data.path {paths}: a weighted blend alternates weight and prefix") from None
    if any(w <= 0 for w in weights):
        raise UserError(f"data.path {paths}: blend weights must be > 0")
    return list(paths[1::2]), weights


def resolve_sources(config: Config, verify: bool = True) -> Sources:
    """Check tokenizer, vocabulary and (with `verify`, on one rank) every dataset's integrity
    before training reads anything."""
    if not config.data.tokenizer:
        raise UserError("data.tokenizer is empty; give the sentencepiece .model or tokenizer.json "
                        "the data was prepared with")
    tokenizer = load_tokenizer(config.data.tokenizer)
    if tokenizer.vocab_size != config.model.vocab_size:
        raise UserError(
            f"tokenizer {config.data.tokenizer} has {tokenizer.vocab_size} tokens but "
            f"model.vocab_size={config.model.vocab_size}; set model.vocab_size="
            f"{tokenizer.vocab_size} or use the tokenizer the model is meant for"
        )
    prefixes, weights = parse_blend(config.data.path)
    fingerprint = hashlib.sha256()
    for prefix in prefixes:
        if verify:
            verify_dataset(prefix, tokenizer_fingerprint=tokenizer.fingerprint,
                           tokenizer_path=config.data.tokenizer, vocab_size=config.model.vocab_size)
        valid = read_manifest(manifest_path(prefix)).splits.get("valid")
        fingerprint.update(f"{valid.bin_sha256}:{valid.idx_sha256};".encode() if valid else b"-;")
    return Sources(prefixes, weights, tokenizer, fingerprint.hexdigest())


class _MegatronTokenizer:
    """The few tokenizer attributes GPTDataset reads (ids and a cache identity)."""

    def __init__(self, tokenizer: Tokenizer):
        self.vocab_size = tokenizer.vocab_size
        self.eod = tokenizer.eod
        self.eos = tokenizer.eod
        self.pad = tokenizer.pad if tokenizer.pad is not None else -1
        self.unique_identifiers = {"class": tokenizer.kind, "sha256": tokenizer.fingerprint}


def build_datasets(config: Config, sources: Sources, dp: int, cache_dir: Path):
    """(train, valid) GPTDatasets sized for the whole run and the fixed validation set."""
    train = [split_prefix(p, "train") for p in sources.prefixes]
    valid = [split_prefix(p, "valid") for p in sources.prefixes]
    has_valid = all(Path(v + ".idx").is_file() for v in valid)
    if config.eval.interval and not has_valid:
        raise UserError(
            f"eval.interval={config.eval.interval} but {sources.prefixes} have no valid split; "
            "prepare the data with --valid-fraction > 0 or set eval.interval=0"
        )
    dataset_config = GPTDatasetConfig(
        random_seed=config.train.seed,
        sequence_length=config.model.seq_length,
        blend_per_split=[
            (train, sources.weights),
            (valid, sources.weights) if has_valid else None,
            None,
        ],
        path_to_cache=str(cache_dir),
        tokenizer=_MegatronTokenizer(sources.tokenizer),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mmap_bin_files=True,
    )
    sizes = [
        config.train.max_steps * config.train.global_batch_size,
        eval_samples(config, dp) if has_valid else None,
        None,
    ]
    train_ds, valid_ds, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, sizes, lambda: True, dataset_config
    ).build()
    return train_ds, valid_ds


def eval_samples(config: Config, dp: int) -> int:
    return config.eval.batches * config.train.micro_batch_size * dp


def micro_batches(dataset, start: int, count: int, micro: int) -> list[Batch]:
    """Samples [start, start+count) of `dataset`, as consecutive micro batches."""
    out = []
    for first in range(start, start + count, micro):
        samples = [dataset[i] for i in range(first, first + micro)]
        out.append({key: torch.stack([s[key] for s in samples])
                    for key in ("tokens", "labels", "loss_mask")})
    return out


def step_batches(dataset, step: int, plan: ParallelPlan, dp_rank: int) -> list[Batch]:
    """This data-parallel rank's micro batches of the global batch of `step`."""
    share = plan.global_batch_size // plan.dp
    return micro_batches(dataset, step * plan.global_batch_size + dp_rank * share, share,
                         plan.micro_batch_size)


def validation_batches(config: Config, dataset, plan: ParallelPlan) -> list[Batch]:
    """This data-parallel rank's share of the fixed validation set (none without one)."""
    if dataset is None:
        return []
    share = eval_samples(config, 1)
    return micro_batches(dataset, ps.get_data_parallel_rank() * share, share,
                         plan.micro_batch_size)
