"""`split_prefix` for lws_megatron/training/trainer.py until its import names
lws_megatron.dataset.manifest, where the dataset manifest lives; then this module goes."""

from lws_megatron.dataset.manifest import split_prefix

__all__ = ["split_prefix"]
