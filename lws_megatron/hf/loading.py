"""Exports as our tools load them: no code from the folder runs, a damaged folder is one line.

A native export (`Olmo2ForCausalLM`, `Qwen3ForCausalLM`, `LlamaForCausalLM`) is built by
transformers' own class; an LWS export by the modeling code of this package, never by the copy in
the folder. A folder whose code is not ours (an edited `modeling_lws.py`, another `.py`, an
`auto_map` pointing elsewhere) is refused unless the user asks to run it (`trust_remote_code`).
Before any weight is read, the tensors the config implies (a model built on the meta device)
must be those `model.safetensors` holds, so an edited `config.json` is named, not half-loaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lws_megatron.errors import UserError
from lws_megatron.export import CODE_FILES, HF_CODE, LWS_AUTO_MAP, export
from lws_megatron.hf.native import NATIVE_CLASSES

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
TRUST_HINT = (
    "re-export the run with this lws-megatron, or pass --trust-remote-code to run the "
    "folder's own code"
)


def go_offline() -> None:
    """Before transformers or datasets is imported: never reach for the hub."""
    for key, value in OFFLINE.items():
        os.environ.setdefault(key, value)


def is_export(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


@contextlib.contextmanager
def export_dir(path: Path, step: int | None = None) -> Iterator[Path]:
    """`path` if it is an export; a temporary export of it if it is a run dir."""
    if is_export(path):
        if step is not None:
            raise UserError(f"{path} is an export (of one step); --step applies to a run dir")
        yield path
    elif (path / "config.yaml").is_file():
        with tempfile.TemporaryDirectory(prefix="lws-export-") as tmp:
            yield export(path, Path(tmp) / "model", step)
    else:
        raise UserError(
            f"{path} is neither a run dir (config.yaml) nor an export dir "
            "(config.json, model.safetensors); pass one of them"
        )


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UserError(f"cannot read {path} ({err}); re-export the run") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} is not a JSON object; re-export the run")
    return value


def check_code(model_dir: Path, config: dict) -> None:
    """Refuse a folder whose code is not this package's (see the module docstring)."""
    lws = config.get("architectures") == ["LWSForCausalLM"]
    shipped = set(CODE_FILES) if lws else set()
    for path in sorted(model_dir.glob("*.py")):
        if path.name not in shipped:
            raise UserError(f"{path} is code lws-megatron does not ship; {TRUST_HINT}")
        if path.read_bytes() != (HF_CODE / path.name).read_bytes():
            raise UserError(
                f"{path} differs from the modeling code of this lws-megatron "
                f"({HF_CODE / path.name}); {TRUST_HINT}"
            )
    if config.get("auto_map", LWS_AUTO_MAP if lws else None) != (LWS_AUTO_MAP if lws else None):
        raise UserError(
            f"{model_dir / 'config.json'}: auto_map {config.get('auto_map')} is not "
            f"lws-megatron's; {TRUST_HINT}"
        )
    tokenizer_config = model_dir / "tokenizer_config.json"
    if tokenizer_config.is_file() and "auto_map" in _json(tokenizer_config):
        raise UserError(f"{tokenizer_config} names code to run (auto_map); {TRUST_HINT}")


def model_class(model_dir: Path, config: dict):
    """The class that builds the export: transformers' for a native one, ours for LWS."""
    [arch] = config.get("architectures") or [None]
    if arch == "LWSForCausalLM":
        from lws_megatron.hf.modeling_lws import LWSForCausalLM

        return LWSForCausalLM
    if arch in NATIVE_CLASSES:
        import transformers

        return getattr(transformers, arch)
    raise UserError(
        f"{model_dir / 'config.json'}: architectures {config.get('architectures')} is not an "
        f"lws-megatron export ({', '.join(('LWSForCausalLM', *NATIVE_CLASSES))}); "
        "export the run with python -m lws_megatron.export"
    )


def check_shapes(model_dir: Path, cls) -> None:
    """The weights config.json implies must be the ones model.safetensors holds."""
    import torch
    from safetensors import safe_open

    config_path = model_dir / "config.json"
    try:
        config = cls.config_class.from_pretrained(model_dir)
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in cls(config).state_dict().items()}
    except Exception as err:  # noqa: BLE001 - transformers' config checks raise many kinds
        raise UserError(
            f"{config_path} does not describe a model ({_first_line(err)}); re-export the run"
        ) from None
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    try:
        with safe_open(model_dir / "model.safetensors", framework="pt") as f:
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise UserError(
            f"cannot read {model_dir / 'model.safetensors'} ({_first_line(err)}); re-export the run"
        ) from None
    for name in sorted(expected.keys() | found.keys()):
        want, have = expected.get(name), found.get(name)
        if want != have:
            raise UserError(
                f"{config_path} does not match model.safetensors: {name} is "
                f"{list(want) if want else 'absent'} by the config and "
                f"{list(have) if have else 'absent'} in the weights; the config was edited "
                "or the files come from different exports: re-export the run"
            )


def load(model_dir: Path, trust_remote_code: bool = False):
    """(model, tokenizer) of an export dir, fp32 on the CPU, in eval mode."""
    go_offline()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    config = _json(model_dir / "config.json")
    if trust_remote_code:
        cls, options = AutoModelForCausalLM, {"trust_remote_code": True}
    else:
        check_code(model_dir, config)
        cls, options = model_class(model_dir, config), {}
        check_shapes(model_dir, cls)
    try:
        model = cls.from_pretrained(model_dir, dtype=torch.float32, **options)
        tokenizer = AutoTokenizer.from_pretrained(
            model_dir, config=model.config, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as err:
        raise UserError(
            f"transformers cannot load {model_dir} ({_first_line(err)}); re-export the run"
        ) from None
    return model.eval(), tokenizer


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return (lines[0] if lines else type(err).__name__)[:300]
