"""Typed run configuration: YAML files with `base:` inheritance and dotted overrides.

A config file reads like a paper's hyperparameter table. A variant names the file it
extends with `base: relative/path.yaml` and restates only what differs (the profile).
Command-line overrides are `section.key=value`, the value parsed as YAML.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from lws_megatron import shapes
from lws_megatron.errors import UserError


@dataclass
class RunConfig:
    name: str = ""
    dir: str = "runs/default"


@dataclass
class ModelConfig:
    num_layers: int = 12
    d_model: int = 768
    d_head: int = 64
    vocab_size: int = 50280
    make_vocab_size_divisible_by: int = 128
    seq_length: int = 1024
    tie_embeddings: bool = False
    # pre: norm before each sublayer (Llama); post: OLMo-2's norm of each sublayer's output
    # inside the residual. The final norm before the head stays in both.
    norm_placement: Literal["pre", "post"] = "pre"
    # head: one RMSNorm per d_head-wide head, gain shared by the heads; full: one RMSNorm over
    # the whole q (and k) projection (OLMo-2). YAML's true/false read as head/none.
    qk_norm: Literal["none", "head", "full"] = "head"
    norm_eps: float = 1e-6
    rope_theta: float = 500000.0
    # megatron: normal(init_std), output projections init_std/sqrt(2L); olmo: every weight
    # truncated normal(init_std) cut at +-3 init_std, no depth scaling. Norm gains start at 1.
    init: Literal["megatron", "olmo"] = "megatron"
    init_std: float = 0.02
    attention_backend: Literal["auto", "sdpa", "te"] = "auto"
    # The sdpa backend's kernel: auto is PyTorch's order (flash first); cudnn and efficient
    # need CUDA. A kernel choice, not a model change: checkpoints move freely between them.
    sdpa_kernel: Literal["auto", "flash", "cudnn", "efficient", "math"] = "auto"


@dataclass
class LWSConfig:
    ffn_knots: list[float] = field(default_factory=lambda: [4.0])
    attn_knots: list[float] = field(default_factory=lambda: [1.0])
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
    num_workers: int = 0


@dataclass
class TrainConfig:
    max_steps: int = 100
    micro_batch_size: int = 4
    global_batch_size: int = 8
    seed: int = 1234
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: Literal["none", "layers", "model"] = "none"  # torch.compile per layer / whole chunk
    log_interval: int = 10
    max_nonfinite_steps: int = 5


@dataclass
class OptimConfig:
    lr: float = 6e-4
    min_lr: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.01
    # embeddings: the input embedding (which a tied head shares); output_head: an untied output
    # layer. The paper decays everything but the input embedding: no_decay: [embeddings].
    no_decay: list[Literal["norms", "biases", "embeddings", "output_head"]] = field(
        default_factory=lambda: ["norms", "biases", "embeddings"]
    )
    clip_grad: float = 1.0
    schedule: Literal["constant", "cosine", "wsd"] = "constant"
    warmup_steps: int = 0
    decay_fraction: float = 0.2


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    # A Megatron pipeline_model_parallel_layout ("Et*3|t*5|t*6|t*4L"), "auto" for the planner,
    # or empty for Megatron's even split.
    pipeline_layout: str = ""


@dataclass
class ZeroConfig:
    stage: Literal[0, 1, 2, 3] = 0


@dataclass
class CheckpointConfig:
    interval: int = 0
    keep: int = 3
    resume: bool = True


@dataclass
class EvalConfig:
    interval: int = 0
    batches: int = 8


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

    @property
    def profile(self) -> shapes.Profile:
        lws = self.lws
        return _project(shapes.Profile, lws, ffn_knots=tuple(lws.ffn_knots),
                        attn_knots=tuple(lws.attn_knots))

    @property
    def dims(self) -> shapes.Dims:
        return _project(shapes.Dims, self.model)

    def summary(self, tp: int | None = None) -> shapes.ModelSummary:
        return shapes.summarize(self.profile, self.dims, self.parallel.tp if tp is None else tp)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Keys that were booleans before they had more choices: the old YAML values keep their meaning.
LEGACY_BOOLEANS = {"model.qk_norm": {True: "head", False: "none"}}


def block_fingerprint(model: ModelConfig) -> dict[str, Any]:
    """The block's choices as a checkpoint records them, in a form older checkpoints share:
    qk_norm head/none as the booleans they hold, norm_placement only once it is post."""
    legacy = {v: k for k, v in LEGACY_BOOLEANS["model.qk_norm"].items()}
    found: dict[str, Any] = {"qk_norm": legacy.get(model.qk_norm, model.qk_norm)}
    if model.norm_placement != "pre":
        found["norm_placement"] = model.norm_placement
    return found


def _project(cls: type, source: Any, **converted: Any) -> Any:
    """The shape engine's view of a config section: its fields of the same names."""
    values = {f.name: getattr(source, f.name) for f in dataclasses.fields(cls)}
    return cls(**{**values, **converted})


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
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def _read_tree(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    if path.resolve() in seen:
        raise UserError(f"{path}: `base:` links form a cycle")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(tree, dict):
        raise UserError(f"{path}: expected a mapping of sections at the top level")
    base = tree.pop("base", None)
    if base is None:
        return tree
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
        if isinstance(value, bool) and f"{prefix}{key}" in LEGACY_BOOLEANS:
            value = LEGACY_BOOLEANS[f"{prefix}{key}"][value]
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
    if origin is list:
        (item,) = typing.get_args(kind)
        if not isinstance(value, list):
            value = [value]
        return [_coerce(v, item, source, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        return _coerce(value, next(o for o in options if o is not type(None)), source, key)
    if kind is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        except ValueError:
            pass
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UserError(
            f"{source}: {key}={value!r} should be {kind.__name__}, got {type(value).__name__}"
        )
    return value


def _validate(config: Config, source: str) -> None:
    def positive(section: str, key: str) -> None:
        value = getattr(getattr(config, section), key)
        if value <= 0:
            raise UserError(f"{source}: {section}.{key}={value} must be > 0")

    for key in ("num_layers", "d_model", "d_head", "vocab_size", "seq_length", "init_std"):
        positive("model", key)
    for key in ("micro_batch_size", "global_batch_size", "max_steps", "log_interval"):
        positive("train", key)
    for key in ("tp", "pp"):
        positive("parallel", key)
    positive("optim", "lr")
    m, t = config.model, config.train
    if m.d_model % m.d_head:
        raise UserError(f"{source}: model.d_head={m.d_head} must divide model.d_model={m.d_model}")
    if t.global_batch_size % t.micro_batch_size:
        raise UserError(
            f"{source}: train.global_batch_size={t.global_batch_size} must be a multiple of "
            f"train.micro_batch_size={t.micro_batch_size}"
        )
    if len(config.optim.betas) != 2:
        raise UserError(f"{source}: optim.betas needs two values, got {config.optim.betas}")
    if not 0 <= config.optim.decay_fraction <= 1:
        raise UserError(f"{source}: optim.decay_fraction must lie in [0, 1]")
    if config.zero.stage >= 2 and config.parallel.pp > 1:
        raise UserError(
            f"{source}: zero.stage={config.zero.stage} needs parallel.pp=1: ZeRO-2/3 partition "
            "gradients during backward, which breaks with the several backward passes of a "
            "pipeline schedule; use zero.stage=1 with pipeline parallelism"
        )
    if config.zero.stage >= 2 and config.parallel.tp > 1 and config.model.qk_norm == "head":
        raise UserError(
            f"{source}: zero.stage={config.zero.stage} with parallel.tp={config.parallel.tp} and "
            "model.qk_norm=head: each TP rank holds part of the shared QK-norm gain's gradient, "
            "which must be summed before ZeRO-2/3 reduce gradients inside backward; use "
            "zero.stage=1 with TP, or model.qk_norm=full (its gain is split with the heads)"
        )
    try:
        config.summary()
    except UserError as err:
        raise UserError(f"{source}: {err}") from None
