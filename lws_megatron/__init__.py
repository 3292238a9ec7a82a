"""lws-megatron: pre-training of layer-wise scaled transformers on Megatron-Core."""

__version__ = "0.1.0"
