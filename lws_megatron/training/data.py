"""Training and validation batches from data_prep outputs, through Megatron-Core's GPTDataset.

`data.path` lists dataset prefixes written by `data_prep.preprocess` (optionally weighted,
Megatron style: ["0.7", "a", "0.3", "b"]); each has `PREFIX_train` and `PREFIX_valid` splits
and a manifest. Every dataset passes data_prep's integrity checks against the configured
tokenizer before a single sample is read.

Sample order is a pure function of the step: the global batch of step k is samples
[k*G, (k+1)*G) of the blended stream, cut into data-parallel slices and then micro batches.
So the data position of a checkpoint is just its step, and every layout sees the same tokens.
The stream itself depends on the data and the seed only (see `sampling`), never on
`train.max_steps`, so a run continued with a larger `max_steps` sees what a longer run would.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import megatron.core
import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.utils import Split

from lws_megatron.config import Config
from lws_megatron.dataset.integrity import verify_dataset
from lws_megatron.dataset.manifest import manifest_path, read_manifest, split_prefix
from lws_megatron.dataset.tokenizer import Tokenizer, load_tokenizer
from lws_megatron.errors import UserError
from lws_megatron.fileio import ensure_dir, os_errors, partial_path
from lws_megatron.training.distributed import ParallelPlan
from lws_megatron.training.sampling import Blend, Epochs

Batch = dict[str, torch.Tensor]  # tokens, labels: [b, s] int64; loss_mask: [b, s] float

_NPY_HEADERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


@dataclass(frozen=True)
class Sources:
    prefixes: list[str]
    weights: list[float] | None
    tokenizer: Tokenizer
    valid_fingerprint: str
    data_hashes: list[str]  # per prefix: its manifest's sha256 of every split's .bin and .idx


def parse_blend(paths: list[str]) -> tuple[list[str], list[float] | None]:
    """["a", "b"] -> (["a", "b"], None); ["0.7", "a", "0.3", "b"] -> weights [0.7, 0.3]."""
    if not paths:
        raise UserError(
            "data.path is empty; give one or more dataset prefixes written by "
            "python -m data_prep.preprocess"
        )
    try:
        float(paths[0])
    except ValueError:
        return list(paths), None
    if len(paths) % 2:
        raise UserError(f"data.path {paths}: a weighted blend alternates weight and prefix")
    try:
        weights = [float(w) for w in paths[0::2]]
    except ValueError:
        raise UserError(
            f"data.path {paths}: a weighted blend alternates weight and prefix"
        ) from None
    if any(w <= 0 for w in weights):
        raise UserError(f"data.path {paths}: blend weights must be > 0")
    return list(paths[1::2]), weights


def resolve_sources(config: Config, verify: bool = True) -> Sources:
    """Check tokenizer, vocabulary and (with `verify`, on one rank) every dataset's integrity
    before training reads anything."""
    if not config.data.tokenizer:
        raise UserError(
            "data.tokenizer is empty; give the sentencepiece .model or tokenizer.json "
            "the data was prepared with"
        )
    tokenizer = load_tokenizer(config.data.tokenizer)
    if tokenizer.vocab_size != config.model.vocab_size:
        raise UserError(
            f"tokenizer {config.data.tokenizer} has {tokenizer.vocab_size} tokens but "
            f"model.vocab_size={config.model.vocab_size}; set model.vocab_size="
            f"{tokenizer.vocab_size} or use the tokenizer the model is meant for"
        )
    prefixes, weights = parse_blend(config.data.path)
    fingerprint = hashlib.sha256()
    data_hashes = []
    for prefix in prefixes:
        if verify:
            verify_dataset(
                prefix,
                tokenizer_fingerprint=tokenizer.fingerprint,
                tokenizer_path=config.data.tokenizer,
                vocab_size=config.model.vocab_size,
                hash_bin=config.data.verify_hashes,
            )
        splits = read_manifest(manifest_path(prefix)).splits
        valid = splits.get("valid")
        fingerprint.update(f"{valid.bin_sha256}:{valid.idx_sha256};".encode() if valid else b"-;")
        data_hashes.append(
            ";".join(
                f"{name}:{record.bin_sha256}:{record.idx_sha256}"
                for name, record in sorted(splits.items())
            )
        )
    return Sources(prefixes, weights, tokenizer, fingerprint.hexdigest(), data_hashes)


class _MegatronTokenizer:
    """The few tokenizer attributes GPTDataset reads (ids and a cache identity)."""

    def __init__(self, tokenizer: Tokenizer):
        self.vocab_size = tokenizer.vocab_size
        self.eod = tokenizer.eod
        self.eos = tokenizer.eod
        self.pad = tokenizer.pad if tokenizer.pad is not None else -1
        self.unique_identifiers = {"class": tokenizer.kind, "sha256": tokenizer.fingerprint}


def build_datasets(config: Config, sources: Sources, cache_dir: Path) -> tuple[Blend, Blend | None]:
    """(train, valid) sample streams whose order depends on the data and the seed only; valid
    is None when the datasets have no validation split."""
    splits = [Split.train]
    if all(Path(split_prefix(p, "valid") + ".idx").is_file() for p in sources.prefixes):
        splits.append(Split.valid)
    elif config.eval.interval:
        raise UserError(
            f"eval.interval={config.eval.interval} but {sources.prefixes} have no valid split; "
            "prepare the data with --valid-fraction > 0 or set eval.interval=0"
        )
    epochs = _cached_epochs(config, sources, splits, cache_dir)
    blends = [_blend(config, sources, [e[split] for e in epochs], split) for split in splits]
    return blends[0], blends[1] if len(blends) > 1 else None


def _blend(config: Config, sources: Sources, epochs: list[GPTDataset], split: Split) -> Blend:
    names = [split_prefix(p, split.name) for p in sources.prefixes]
    for name, epoch in zip(names, epochs):
        if len(epoch) == 0:
            raise UserError(
                f"{name} holds fewer than model.seq_length+1={config.model.seq_length + 1} "
                "tokens, not one sample; prepare more data or lower model.seq_length"
            )
    streams = [Epochs(epoch, config.train.seed, k) for k, epoch in enumerate(epochs)]
    return Blend(streams, sources.weights or [len(e) for e in epochs], names)


def _cached_epochs(
    config: Config, sources: Sources, splits: list[Split], cache_dir: Path
) -> list[dict[Split, GPTDataset]]:
    """One epoch of each split of each dataset. Megatron caches its indices; they live in a
    directory named by everything they depend on (the data's fingerprint first), so data
    re-prepared under the same prefix never meets indices built for the old files. Rank 0
    builds a missing directory beside its place and renames it in once complete; every rank
    then checks the cached files before Megatron loads them."""
    directories = [cache_dir / _cache_key(config, sources, k) for k in range(len(sources.prefixes))]
    if not dist.is_initialized() or dist.get_rank() == 0:
        for prefix, directory in zip(sources.prefixes, directories):
            if not directory.is_dir():
                _build_cache(config, sources, prefix, splits, directory)
    if dist.is_initialized():
        dist.barrier()
    return [
        _open_epochs(config, sources, prefix, splits, directory, check=True)
        for prefix, directory in zip(sources.prefixes, directories)
    ]


def _cache_key(config: Config, sources: Sources, k: int) -> str:
    """What the cached indices of dataset k depend on: its files (their sha256 as its manifest
    recorded them, not re-hashed), where they are, the tokenizer, seed, sequence length and the
    Megatron version that wrote them."""
    parts = [
        sources.data_hashes[k],
        os.path.abspath(sources.prefixes[k]),
        sources.tokenizer.fingerprint,
        str(config.train.seed),
        str(config.model.seq_length),
        megatron.core.__version__,
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def _build_cache(
    config: Config, sources: Sources, prefix: str, splits: list[Split], directory: Path
) -> None:
    scratch = Path(partial_path(directory))
    try:
        with os_errors(directory):
            shutil.rmtree(scratch, ignore_errors=True)  # left by a run killed while building
            ensure_dir(scratch)
            _open_epochs(config, sources, prefix, splits, scratch, check=False)
            os.replace(scratch, directory)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _open_epochs(
    config: Config, sources: Sources, prefix: str, splits: list[Split], cache: Path, check: bool
) -> dict[Split, GPTDataset]:
    """Megatron's one-epoch GPTDataset of each split, its indices built in or loaded from
    `cache` (checked first with `check`)."""
    if check:
        check_cached_indices(cache)
    gpt_config = GPTDatasetConfig(
        random_seed=config.train.seed,
        sequence_length=config.model.seq_length,
        blend_per_split=[
            ([split_prefix(prefix, s.name)], None) if s in splits else None for s in Split
        ],
        path_to_cache=str(cache),
        tokenizer=_MegatronTokenizer(sources.tokenizer),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mmap_bin_files=True,
    )
    epochs = {}
    for split in splits:
        path = os.path.abspath(split_prefix(prefix, split.name))
        indexed = GPTDataset.build_low_level_dataset(path, gpt_config)
        documents = np.arange(GPTDataset.numel_low_level_dataset(indexed), dtype=np.int32)
        epochs[split] = GPTDataset(indexed, path, documents, None, split, gpt_config)
    return epochs


def check_cached_indices(directory: Path) -> None:
    """Refuse any cached index that is not a complete array of plain numbers: Megatron loads
    them with numpy.load(allow_pickle=True), which would unpickle (and so run) anything else."""
    with os_errors(directory):
        for path in sorted(directory.glob("*.npy")):
            problem = _npy_problem(path)
            if problem:
                raise UserError(
                    f"cached index {path} {problem}: damaged or planted; delete "
                    f"{directory} (it is rebuilt from the data)"
                )


def _npy_problem(path: Path) -> str | None:
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            if version not in _NPY_HEADERS:
                return f"is a .npy file of format {version}"
            shape, _, dtype = _NPY_HEADERS[version](f)
        except ValueError:
            return "is not a .npy array"
        if dtype.kind not in "biuf":
            return f"holds {dtype}, not plain numbers"
        expected = f.tell() + math.prod(shape) * dtype.itemsize
    size = path.stat().st_size
    if size != expected:
        return f"is {size} bytes where its header promises {expected}"
    return None


def eval_samples(config: Config, dp: int) -> int:
    return config.eval.batches * config.train.micro_batch_size * dp


def micro_batches(dataset, start: int, count: int, micro: int) -> list[Batch]:
    """Samples [start, start+count) of `dataset`, as consecutive micro batches."""
    out = []
    for first in range(start, start + count, micro):
        samples = [dataset[i] for i in range(first, first + micro)]
        out.append(
            {
                key: torch.stack([s[key] for s in samples])
                for key in ("tokens", "labels", "loss_mask")
            }
        )
    return out


def step_batches(dataset, step: int, plan: ParallelPlan, dp_rank: int) -> list[Batch]:
    """This data-parallel rank's micro batches of the global batch of `step`."""
    share = plan.global_batch_size // plan.dp
    return micro_batches(
        dataset, step * plan.global_batch_size + dp_rank * share, share, plan.micro_batch_size
    )


def validation_batches(config: Config, dataset, plan: ParallelPlan) -> list[Batch]:
    """This data-parallel rank's share of the fixed validation set (none without one)."""
    if dataset is None:
        return []
    share = eval_samples(config, 1)
    return micro_batches(dataset, ps.get_data_parallel_rank() * share, share, plan.micro_batch_size)
