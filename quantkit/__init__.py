"""quantkit: quantize Llama-family checkpoints the way Meta quantized Llama 3.2, and score them."""

import logging as _logging

__version__ = "0.1.0"

# transformers imports torchao when it is installed; torchao then warns about CUDA-only
# extensions this CPU build cannot load, and torch about a deprecated pytree call. Neither
# concerns quantkit's users.
_logging.getLogger("torchao").setLevel(_logging.ERROR)
_logging.getLogger("torch.utils._pytree").setLevel(_logging.ERROR)
