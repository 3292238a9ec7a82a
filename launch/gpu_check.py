"""GPU correctness: the bf16 model on CUDA against fp32 on CPU, same weights, same batch.

    python launch/gpu_check.py [CONFIG] [key=value ...]

Checks that the loss agrees within bf16 tolerance, that gradients point the same way, and
that PyTorch's flash-attention kernel runs our attention layout (SDPA on [b, h, s, d]).
Exits non-zero, naming the check, when one fails.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from lws_megatron.config import load_config


def _loss_and_grads(model, batch, device):
    tokens, labels, positions = (t.to(device) for t in (batch.tokens, batch.labels, batch.position_ids))
    model.zero_grad(set_to_none=True)
    loss = model(tokens, positions, None, labels=labels).float().mean()
    loss.backward()
    grads = {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads


def main(argv: list[str]) -> int:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from lws_megatron.benchmark import synthetic_batch
    from lws_megatron.model.build import build_model
    from lws_megatron.model.parallel import destroy_parallel, initialize_parallel
    from lws_megatron.training.trainer import init_processes

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 1
    path = argv[0] if argv and "=" not in argv[0] else "configs/paper/crown-18l.yaml"
    overrides = [a for a in argv if "=" in a]
    init_processes()
    cpu_config = load_config(path, ["train.precision=fp32", *overrides])
    gpu_config = load_config(path, ["train.precision=bf16", *overrides])
    initialize_parallel(cpu_config)
    failures = []
    try:
        reference = build_model(cpu_config, device="cpu")
        model = build_model(gpu_config, device=torch.device("cuda"))
        model.load_state_dict(reference.state_dict(), strict=True)
        batch = synthetic_batch(cpu_config, micro=2)
        cpu_loss, cpu_grads = _loss_and_grads(reference, batch, "cpu")
        gpu_loss, gpu_grads = _loss_and_grads(model, batch, "cuda")
        rel = abs(gpu_loss - cpu_loss) / cpu_loss
        print(f"loss: fp32 CPU {cpu_loss:.5f}, bf16 GPU {gpu_loss:.5f}, relative difference {rel:.2e}")
        if rel > 1e-2:
            failures.append(f"bf16 loss differs from fp32 by {rel:.2e} (> 1e-2)")
        worst = min(
            (F.cosine_similarity(cpu_grads[n].flatten(), gpu_grads[n].flatten(), dim=0).item(), n)
            for n in cpu_grads
        )
        print(f"gradients: lowest cosine similarity {worst[0]:.4f} ({worst[1]})")
        if worst[0] < 0.99:
            failures.append(f"gradient of {worst[1]} has cosine similarity {worst[0]:.4f} (< 0.99)")
        try:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                _loss_and_grads(model, batch, "cuda")
            print("flash attention: the model's attention runs on the FLASH_ATTENTION backend")
        except RuntimeError as err:
            failures.append(f"flash attention refused our layout: {str(err).splitlines()[0]}")
    finally:
        destroy_parallel()
    for failure in failures:
        print(f"FAILED: {failure}")
    print("GPU checks passed" if not failures else f"{len(failures)} GPU check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
