"""lws-megatron: pre-training of layer-wise scaled transformers on Megatron-Core."""

__version__ = "0.1.0"

import logging
import sys
import warnings

# Megatron-Core and DeepSpeed warn at import about optional CUDA packages (Transformer Engine,
# Apex) that a run without them does not need; every command would otherwise open with them.
warnings.filterwarnings("ignore", category=UserWarning, module=r"(megatron|deepspeed)\.")
warnings.filterwarnings("ignore", category=FutureWarning, module=r"(megatron|deepspeed)\.")


class _ToStderr(logging.Filter):
    """DeepSpeed logs to stdout, where it would land in a command's output; its records go to
    stderr instead, formatted as DeepSpeed does. Its warning on import that it found no GPU is
    dropped: a CPU run is chosen (`device.py`), and the warning would be a second line of every
    one-line error."""

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[%(asctime)s] [%(levelname)s] [DeepSpeed] %(message)s"))

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("Setting accelerator to CPU"):
            return False
        if record.levelno >= logging.getLogger("DeepSpeed").getEffectiveLevel():
            self.handler.handle(record)
        return False


# Installed before DeepSpeed creates its logger (the same object): it holds from the first record.
logging.getLogger("DeepSpeed").addFilter(_ToStderr())
