"""Typed run configuration: YAML files with `base:` inheritance and dotted overrides.

A config file reads like a paper's hyperparameter table. A variant names the file it
extends with `base: relative/path.yaml` and restates only what differs (the profile).
Command-line overrides are `section.key=value`, the value parsed as YAML.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from lws_megatron import shapes
from lws_megatron.errors import UserError


@dataclass(frozen=True)
class Range:
    """The values a numeric key allows (each item, for a list key); `_validate` enforces it."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low}"
        return (
            f"in {'(' if self.low_open else '['}{self.low}, "
            f"{self.high}{')' if self.high_open else ']'}"
        )


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
AT_LEAST_ONE = Range(1)
FRACTION = Range(0, 1)


def _within(default: Any, allowed: Range) -> Any:
    """A config field whose values must lie in `allowed`."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"range": allowed})
    return field(default=default, metadata={"range": allowed})


@dataclass
class RunConfig:
    name: str = ""
    dir: str = "runs/default"
    # How long a collective waits for the other ranks once training runs (setup and checkpoint
    # saves wait at least 30 min); a rank that stops answering ends the job after this.
    collective_timeout_s: float = _within(600.0, POSITIVE)


@dataclass(frozen=True)
class ModelConfig:
    """Dimensions and block; frozen like `lws`, so `Config.summary` caches by their value."""

    num_layers: int = _within(12, AT_LEAST_ONE)
    d_model: int = _within(768, AT_LEAST_ONE)
    d_head: int = _within(64, AT_LEAST_ONE)
    vocab_size: int = _within(50280, AT_LEAST_ONE)
    make_vocab_size_divisible_by: int = 128  # >= 1: the shape engine checks it, like lws.*
    seq_length: int = _within(1024, AT_LEAST_ONE)
    tie_embeddings: bool = False
    # pre: norm before each sublayer (Llama); post: OLMo-2's norm of each sublayer's output
    # inside the residual. The final norm before the head stays in both.
    norm_placement: Literal["pre", "post"] = "pre"
    # head: one RMSNorm per d_head-wide head, gain shared by the heads; full: one RMSNorm over
    # the whole q (and k) projection (OLMo-2). YAML's true/false read as head/none.
    qk_norm: Literal["none", "head", "full"] = "head"
    norm_eps: float = _within(1e-6, POSITIVE)
    rope_theta: float = _within(500000.0, POSITIVE)
    # megatron: normal(init_std), output projections init_std/sqrt(2L); olmo: every weight
    # truncated normal(init_std) cut at +-3 init_std, no depth scaling. Norm gains start at 1.
    init: Literal["megatron", "olmo"] = "megatron"
    init_std: float = _within(0.02, POSITIVE)
    attention_backend: Literal["auto", "sdpa", "te"] = "auto"
    # The sdpa backend's kernel: auto is PyTorch's order (flash first); cudnn and efficient
    # need CUDA. A kernel choice, not a model change: checkpoints move freely between them.
    sdpa_kernel: Literal["auto", "flash", "cudnn", "efficient", "math"] = "auto"
    # The output head and its cross-entropy fused over chunks of loss_chunk_rows tokens
    # (model/fused_loss.py): no [tokens, vocab] logits written, no fp32 softmax kept for
    # backward (3.3 GB at 16K tokens x 50K vocabulary). Same loss, gradients and checkpoints;
    # false keeps Megatron's head. Logits without labels (generation) come from Megatron's.
    fused_loss: bool = False
    loss_chunk_rows: int = _within(4096, AT_LEAST_ONE)


@dataclass(frozen=True)
class LWSConfig:
    """The profile across depth; the shape engine checks its ranges (shapes._check_profile)."""

    ffn_knots: tuple[float, ...] = (4.0,)
    attn_knots: tuple[float, ...] = (1.0,)
    framed: bool = False
    frame_ffn: float = 4.0
    frame_attn: float = 1.0
    gqa: Literal["group_size", "fixed_kv"] = "group_size"
    kv_group_size: int = 3
    num_kv_heads: int = 4
    ffn_multiple: int = 256
    tp_aware_rounding: bool = False


@dataclass
class DataConfig:
    # Dataset prefixes written by data_prep, optionally weighted: ["0.7", "a", "0.3", "b"].
    path: list[str] = field(default_factory=list)
    tokenizer: str = ""
    # Processes that build the next steps' batches while the device trains (0: built in the
    # training process, between steps, while the device waits).
    num_workers: int = _within(2, NON_NEGATIVE)
    # Check each .bin against its manifest's sha256 before training (about 1.3 s per GB of
    # tokens); false skips only the hash (sizes, dtype, ids and the tokenizer are still checked).
    verify_hashes: bool = True


@dataclass
class TrainConfig:
    max_steps: int = _within(100, AT_LEAST_ONE)
    micro_batch_size: int = _within(4, AT_LEAST_ONE)
    global_batch_size: int = _within(8, AT_LEAST_ONE)
    seed: int = _within(1234, Range(0, 2**32 - 1))  # numpy's seed range
    # auto: bf16 on GPU, fp32 on CPU (`device_precision`). bf16: bf16 weights, fp32 master
    # weights in the optimizer; bf16-autocast: fp32 weights, bf16 autocast (GPU only).
    precision: Literal["auto", "fp32", "bf16", "bf16-autocast"] = "auto"
    compile: Literal["none", "layers", "model"] = "none"  # torch.compile per layer / whole chunk
    # CUDA graphs of the compiled model's forward and backward (torch.compile's reduce-overhead
    # mode): one launch for all of a step's kernels. Needs CUDA, train.compile=model, TP=PP=1.
    cuda_graphs: bool = False
    log_interval: int = _within(10, AT_LEAST_ONE)
    max_nonfinite_steps: int = _within(5, AT_LEAST_ONE)
    # Optional callbacks by name (lws_megatron/training/callbacks), e.g. [step_time_watchdog].
    callbacks: list[str] = field(default_factory=list)


@dataclass
class OptimConfig:
    lr: float = _within(6e-4, POSITIVE)
    min_lr: float = _within(0.0, NON_NEGATIVE)
    betas: list[float] = _within([0.9, 0.95], Range(0, 1, high_open=True))
    eps: float = _within(1e-8, POSITIVE)
    weight_decay: float = _within(0.01, NON_NEGATIVE)
    # embeddings: the input embedding (which a tied head shares); output_head: an untied output
    # layer. The paper decays everything but the input embedding: no_decay: [embeddings].
    no_decay: list[Literal["norms", "biases", "embeddings", "output_head"]] = field(
        default_factory=lambda: ["norms", "biases", "embeddings"]
    )
    clip_grad: float = _within(1.0, NON_NEGATIVE)  # 0: no clipping
    schedule: Literal["constant", "cosine", "wsd"] = "constant"
    warmup_steps: int = _within(0, NON_NEGATIVE)
    decay_fraction: float = _within(0.2, FRACTION)


@dataclass
class ParallelConfig:
    tp: int = _within(1, AT_LEAST_ONE)
    pp: int = _within(1, AT_LEAST_ONE)
    # A Megatron pipeline_model_parallel_layout ("Et*3|t*5|t*6|t*4L"), "auto" for the planner,
    # or empty for Megatron's even split.
    pipeline_layout: str = ""
    # Activation recomputation, Megatron-Core's: selective recomputes each chosen layer's MLP
    # in backward; full keeps only the layer's input and runs the whole layer again.
    recompute: Literal["none", "selective", "full"] = "none"
    # The layers recomputed: all; widest:N, the N layers that keep the most activations for
    # backward (ties: the lower number); or a list of layer numbers, 0-based as describe prints.
    recompute_layers: Union[str, list[int]] = "all"
    # Megatron's sequence parallelism at TP > 1: norms and residual adds, and the activations
    # they keep, split over the TP ranks along the sequence. auto: on at TP > 1 where
    # model.seq_length divides by TP; off (and true) at TP = 1, where there is nothing to split.
    sequence_parallel: Union[bool, Literal["auto"]] = "auto"

    def recompute_layer_choice(self) -> tuple[str, int | list[int] | None]:
        """("all", None), ("widest", N) or ("list", [numbers]), as recompute_layers reads."""
        layers = self.recompute_layers
        if isinstance(layers, list):
            return "list", layers
        if layers.strip() == "all":
            return "all", None
        kind, _, count = layers.strip().partition(":")
        if kind != "widest" or not count.strip().isdigit():
            raise ValueError(layers)
        return "widest", int(count)


@dataclass
class ZeroConfig:
    """Data parallelism: how the gradients are reduced and how the optimizer state is sharded.

    Megatron-Core's DistributedDataParallel reduces the gradients at every stage, in buckets,
    each as soon as the last micro batch's backward has produced it; DeepSpeed ZeRO holds the
    optimizer state: whole on every rank (0), sharded over the data-parallel ranks (1, 2).
    """

    # 0: AdamW on every rank; 1: fp32 masters and moments sharded (DeepSpeed ZeRO-1); 2: the
    # same through DeepSpeed's stage-2 optimizer (the gradients stay whole in the buckets).
    stage: Literal[0, 1, 2] = 0
    overlap_grad_reduce: bool = True  # false: one reduction after the whole backward
    # ZeRO >= 1: the updated weights' all-gather runs behind the next forward, segment by
    # segment; false: inside the optimizer step.
    overlap_param_gather: bool = True
    # Parameters per bucket; 0: auto, a quarter of a model chunk, at most Megatron's default
    # (40M, or 1M per data-parallel rank beyond 40).
    bucket_size: int = _within(0, NON_NEGATIVE)
    # auto: the weights' dtype, fp32 where a step accumulates several micro batches.
    grad_reduce_dtype: Literal["auto", "fp32", "bf16"] = "auto"


@dataclass
class CheckpointConfig:
    interval: int = _within(0, NON_NEGATIVE)
    keep: int = _within(3, AT_LEAST_ONE)
    resume: bool = True
    # Write the files in the background while training goes on (the step waits only for host
    # copies of this rank's state); null: on CUDA devices.
    async_save: bool | None = None


@dataclass
class EvalConfig:
    interval: int = _within(0, NON_NEGATIVE)  # also evaluates at step 0 and at the end
    batches: int = 8  # packed: micro batches per DP rank; at least 1 when eval.interval > 0
    # packed: a fixed set of packed sequences; documents: the whole validation split, one
    # sequence per document, padding not scored (the paper's protocol)
    mode: Literal["packed", "documents"] = "packed"


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lws: LWSConfig = field(default_factory=LWSConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def summary(self, tp: int | None = None) -> shapes.ModelSummary:
        """The shape engine's summary at `tp` (default parallel.tp), computed once per value."""
        return _summary(self.lws, self.model, self.parallel.tp if tp is None else tp)

    def to_dict(self) -> dict[str, Any]:
        """The config as its YAML dump reads back (knots as lists), as `config.yaml` holds it."""
        return yaml.safe_load(dump_config(self))


_summary = functools.lru_cache(maxsize=64)(shapes.summarize)


def device_precision(precision: str, device_type: str) -> str:
    """`train.precision` on a device type ("cuda", "cpu"): auto is bf16 on CUDA, else fp32."""
    if precision == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    return precision


def block_fingerprint(model: ModelConfig) -> dict[str, Any]:
    """The block's choices as a checkpoint records them: norm_placement only once it is post."""
    found: dict[str, Any] = {"qk_norm": model.qk_norm}
    if model.norm_placement != "pre":
        found["norm_placement"] = model.norm_placement
    return found


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read a YAML config (following `base:` links), apply `a.b=value` overrides, validate."""
    path = Path(path)
    tree = _read_tree(path, seen=())
    for item in overrides:
        _apply_override(tree, item)
    config = _build(Config, tree, str(path), prefix="")
    _validate(config, str(path))
    return config


def config_name(path: str | Path) -> str:
    return Path(path).stem


def dump_config(config: Config) -> str:
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)


def _read_tree(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    if path.resolve() in seen:
        raise UserError(f"{path}: `base:` links form a cycle")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file (not UTF-8); name a YAML config") from None
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(tree, dict):
        raise UserError(f"{path}: expected a mapping of sections at the top level")
    base = tree.pop("base", None)
    if base is None:
        return tree
    if not isinstance(base, str) or not base.strip():
        raise UserError(
            f"{path}: base={base!r} should name the YAML file this one extends, "
            "e.g. base: _reference.yaml"
        )
    parent = _read_tree(path.parent / base, seen + (path.resolve(),))
    return _merge(parent, tree)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _apply_override(tree: dict[str, Any], item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise UserError(f"override {item!r}: write it as section.key=value")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and not raw.strip().startswith(("'", '"')):
        value = raw.strip()  # an unquoted string keeps its text: YAML would cut "a #b" at " #"
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"override {item!r}: {part} is not a section")
    node[parts[-1]] = value


def _build(cls: type, tree: Any, source: str, prefix: str) -> Any:
    if not isinstance(tree, dict):
        raise UserError(f"{source}: {prefix.rstrip('.') or 'top level'} must be a mapping")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in tree.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(
                f"{source}: unknown key {prefix}{key}{hint}; valid keys: {', '.join(names)}"
            )
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            kwargs[key] = _build(kind, value, source, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, kind, source, f"{prefix}{key}")
    return cls(**kwargs)


def _coerce(value: Any, kind: Any, source: str, key: str) -> Any:
    origin = typing.get_origin(kind)
    if origin is Literal:
        choices = typing.get_args(kind)
        if value not in choices or type(value) is not type(choices[0]):
            raise UserError(
                f"{source}: {key}={value!r} is not allowed; choose one of "
                f"{', '.join(repr(c) for c in choices)}"
            )
        return value
    if origin in (list, tuple):
        item = typing.get_args(kind)[0]  # list[item] or tuple[item, ...]
        if not isinstance(value, list):
            value = [value]
        return origin(_coerce(v, item, source, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        *others, last = [o for o in options if o is not type(None)]
        for option in others:  # the first that takes the value; the last one's error
            try:
                return _coerce(value, option, source, key)
            except UserError:
                pass
        return _coerce(value, last, source, key)
    if kind is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            number = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        except ValueError:
            pass
        else:
            if not math.isfinite(number):
                raise UserError(f"{source}: {key}={value!r} must be a finite number")
            return number
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UserError(
            f"{source}: {key}={value!r} should be {kind.__name__}, got {type(value).__name__}"
        )
    return value


def _validate(config: Config, source: str) -> None:
    _check_ranges(config, source)
    if not config.run.dir.strip():
        raise UserError(
            f"{source}: run.dir is empty, which would put the run's lock, checkpoints and "
            "metrics in the current directory; name a directory, e.g. run.dir=runs/crown"
        )
    m, t, o = config.model, config.train, config.optim
    if o.min_lr > o.lr:
        raise UserError(f"{source}: optim.min_lr={o.min_lr} must not exceed optim.lr={o.lr}")
    if config.eval.interval and config.eval.batches < 1:
        raise UserError(
            f"{source}: eval.batches={config.eval.batches} must be >= 1 while "
            f"eval.interval={config.eval.interval} > 0; set eval.interval=0 to turn eval off"
        )
    if m.d_model % m.d_head:
        raise UserError(f"{source}: model.d_head={m.d_head} must divide model.d_model={m.d_model}")
    if t.global_batch_size % t.micro_batch_size:
        raise UserError(
            f"{source}: train.global_batch_size={t.global_batch_size} must be a multiple of "
            f"train.micro_batch_size={t.micro_batch_size}"
        )
    if len(o.betas) != 2:
        raise UserError(f"{source}: optim.betas needs two values, got {o.betas}")
    _check_parallel(config, source)
    try:
        config.summary()
    except UserError as err:
        raise UserError(f"{source}: {err}") from None


def _check_parallel(config: Config, source: str) -> None:
    p, n = config.parallel, config.model.num_layers
    try:
        kind, chosen = p.recompute_layer_choice()
    except ValueError:
        raise UserError(
            f"{source}: parallel.recompute_layers={p.recompute_layers!r}: write all, widest:N "
            "or a list of layer numbers, e.g. [0, 9]"
        ) from None
    if kind == "widest" and not 1 <= chosen <= n:
        raise UserError(
            f"{source}: parallel.recompute_layers=widest:{chosen} must name 1 to {n} layers "
            f"(model.num_layers={n})"
        )
    if kind == "list" and (
        not chosen or len(set(chosen)) != len(chosen) or not all(0 <= i < n for i in chosen)
    ):
        raise UserError(
            f"{source}: parallel.recompute_layers={chosen} must list distinct layer numbers "
            f"from 0 to {n - 1}"
        )
    if p.recompute != "none" and config.train.cuda_graphs:
        raise UserError(
            f"{source}: parallel.recompute={p.recompute} with train.cuda_graphs=true: replaying "
            "a recomputing backward as CUDA graphs is not supported; set "
            "parallel.recompute=none or train.cuda_graphs=false"
        )


def _check_ranges(config: Config, source: str) -> None:
    for section in dataclasses.fields(config):
        values = getattr(config, section.name)
        for f in dataclasses.fields(values):
            allowed = f.metadata.get("range")
            value = getattr(values, f.name)
            items = value if isinstance(value, list) else [value]
            if allowed is not None and not all(v in allowed for v in items):
                each = "each value " if isinstance(value, list) else ""
                raise UserError(
                    f"{source}: {section.name}.{f.name}={value} is out of range: "
                    f"{each}must be {allowed}"
                )
