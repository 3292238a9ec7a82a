"""GPU correctness: the bf16 model on CUDA against fp32 on CPU, same weights, same batch.

    python launch/gpu_check.py [CONFIG] [key=value ...]     (default configs/paper/crown-18l.yaml)

The fp32 reference runs in a child process that cannot see the GPU (so the model is built and
run exactly as on a CPU machine) and hands over its weights, loss and gradients. The check
passes when the bf16 loss agrees within bf16 tolerance and every gradient points the same way:
eager with PyTorch's own attention kernel, with flash and with cuDNN attention pinned
(model.sdpa_kernel), and compiled whole (train.compile=model, with no graph break on CUDA
either). Then steady-state training steps, eager and compiled, under
`torch.cuda.set_sync_debug_mode("error")`: a step must never make the host wait for the GPU.
Exits 1 naming what failed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from lws_megatron.cli import add_configs, configs_and_overrides
from lws_megatron.cli import parser as make_parser
from lws_megatron.config import load_config
from lws_megatron.errors import UserError, cli_entry

if TYPE_CHECKING:
    import torch

DEFAULT = "configs/paper/crown-18l.yaml"


def _loss_and_grads(dtype, model, batch, device):
    from lws_megatron.device import autocast

    tokens, labels = batch["tokens"].to(device), batch["labels"].to(device)
    model.zero_grad(set_to_none=True)
    with autocast(device, dtype):
        per_token = model(tokens, None, None, labels=labels)
    loss = per_token.float().mean()
    loss.backward()
    grads = {
        n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.grad is not None
    }
    return loss.item(), grads


def _build(path: str, overrides: list[str], precision: str, device: torch.device):
    """(config, autocast dtype, model) inside fresh model-parallel groups of one process."""
    import torch.distributed as dist

    from lws_megatron.model import build_model
    from lws_megatron.training import distributed
    from lws_megatron.training.train_module import model_args

    config = load_config(path, [f"train.precision={precision}", *overrides])
    distributed.init_processes()
    plan = distributed.resolve_plan(config, dist.get_world_size())
    distributed.initialize_model_parallel(plan, config.train.seed)
    args = model_args(config, plan, device)
    return config, args.autocast_dtype, build_model(args, seed=config.train.seed, device=device)


def reference(out: str, path: str, overrides: list[str]) -> None:
    """fp32 on the CPU: weights, batch, loss and gradients into `out`."""
    import torch

    from lws_megatron.measure.batches import synthetic_batch

    config, dtype, model = _build(path, overrides, "fp32", torch.device("cpu"))
    batch = synthetic_batch(config, micro=2)
    loss, grads = _loss_and_grads(dtype, model, batch, torch.device("cpu"))
    torch.save({"state": model.state_dict(), "batch": batch, "loss": loss, "grads": grads}, out)


def _compare(label: str, ref: dict, loss: float, grads: dict) -> list[str]:
    import torch.nn.functional as F

    failures = []
    rel = abs(loss - ref["loss"]) / ref["loss"]
    print(
        f"{label}: loss fp32 CPU {ref['loss']:.5f}, bf16 GPU {loss:.5f}, relative "
        f"difference {rel:.2e}"
    )
    if rel > 1e-2:
        failures.append(f"{label}: bf16 loss differs from fp32 by {rel:.2e} (> 1e-2)")
    worst = min(
        (F.cosine_similarity(g.flatten(), grads[n].flatten(), dim=0).item(), n)
        for n, g in ref["grads"].items()
    )
    print(f"{label}: gradients' lowest cosine similarity {worst[0]:.4f} ({worst[1]})")
    if worst[0] < 0.99:
        failures.append(
            f"{label}: gradient of {worst[1]} has cosine similarity {worst[0]:.4f} (< 0.99)"
        )
    return failures


def check(path: str, overrides: list[str]) -> list[str]:
    """bf16 on CUDA: eager on PyTorch's own SDPA choice, on each pinned fused kernel
    (model.sdpa_kernel), and compiled whole (train.compile=model)."""
    import torch

    from lws_megatron.model.compile import compile_chunks, compile_stats
    from lws_megatron.training import distributed

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "reference.pt")
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
        subprocess.run(
            [sys.executable, __file__, "--reference", out, path, *overrides], env=env, check=True
        )
        ref = torch.load(out, weights_only=True)
    device = torch.device("cuda")
    failures = []
    for mode, kernel in (("none", "auto"), ("none", "flash"), ("none", "cudnn"), ("model", "auto")):
        label = f"compile={mode} sdpa_kernel={kernel}"
        try:
            config, dtype, model = _build(
                path,
                [*overrides, f"train.compile={mode}", f"model.sdpa_kernel={kernel}"],
                "bf16",
                device,
            )
        except UserError as err:  # a kernel this card or PyTorch build lacks: not a failure
            print(f"{label}: unavailable: {err}")
            distributed.destroy_model_parallel()
            continue
        model.load_state_dict(ref["state"], strict=True)
        compile_chunks([model], mode)
        loss, grads = _loss_and_grads(dtype, model, ref["batch"], device)
        failures += _compare(label, ref, loss, grads)
        if mode != "none":
            stats = compile_stats()
            print(
                f"{label}: {stats['compiled_graphs']} graph(s), "
                f"{stats['graph_breaks']} graph break(s)"
            )
            if stats["graph_breaks"]:
                failures.append(f"{label}: {stats['graph_breaks']} graph break(s) on CUDA")
        del model
        distributed.destroy_model_parallel()
    return failures


def check_sync_free(path: str, overrides: list[str]) -> list[str]:
    """Steady-state steps, eager and compiled whole, with any host wait an error."""
    from lws_megatron.measure.syncs import first_sync
    from lws_megatron.training import distributed

    failures = []
    for mode in ("none", "model"):
        config = load_config(path, [*overrides, f"train.compile={mode}"])
        distributed.init_processes()
        sync = first_sync(config)
        label = f"sync-free step, compile={mode}"
        print(f"{label}: {'no host wait' if sync is None else sync}")
        if sync is not None:
            failures.append(f"{label}: the host waited for the device: {sync}")
    return failures


@cli_entry
def main(argv: list[str]) -> int:
    if argv[:1] == ["--reference"]:  # the fp32 child process of `check`
        reference(argv[1], argv[2], argv[3:])
        return 0
    parser = make_parser("launch/gpu_check.py", __doc__)
    add_configs(parser)
    args = parser.parse_intermixed_args(argv)
    if not (args.configs or [i for i in args.items if "=" not in i]):
        args.configs = [DEFAULT]
    [path], overrides = configs_and_overrides(args, DEFAULT, exactly_one=True)

    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 1
    failures = check(path, overrides) + check_sync_free(path, overrides)
    for failure in failures:
        print(f"FAILED: {failure}")
    print("GPU checks passed" if not failures else f"{len(failures)} GPU check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
