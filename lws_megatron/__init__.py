"""lws-megatron: pre-training of layer-wise scaled transformers on Megatron-Core."""

__version__ = "0.1.0"

import warnings

# Megatron-Core and DeepSpeed warn at import about optional CUDA packages (Transformer Engine,
# Apex) that a run without them does not need; every command would otherwise open with them.
warnings.filterwarnings("ignore", category=UserWarning, module=r"(megatron|deepspeed)\.")
warnings.filterwarnings("ignore", category=FutureWarning, module=r"(megatron|deepspeed)\.")
