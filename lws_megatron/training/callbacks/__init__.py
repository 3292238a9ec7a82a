"""What happens around the training loop, one callback a file.

A callback subclasses `Callback`, overrides the hooks it needs, and registers under a name. The
default ones (metrics, evaluation, non-finite stop, pre-emption, checkpointing) always run; an
optional one runs when its name is in `train.callbacks`. Every module of this package is
imported here, so a new callback is a new file and one line of config.
"""

import importlib
import pkgutil

from lws_megatron.training.callbacks.base import Callback, build_callbacks, registered

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Callback", "build_callbacks", "registered"]
