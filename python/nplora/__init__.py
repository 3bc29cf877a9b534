"""nplora: LoRA (Low-Rank Adaptation) for NumPy, with a fast C++ core.

>>> import numpy as np, nplora
>>> layer = nplora.LoraLinear(np.zeros((4, 3), np.float32), r=2, lora_alpha=4)
>>> layer(np.ones((5, 3), np.float32)).shape
(5, 4)
"""

from __future__ import annotations

from ._core import __version__
from ._layer import LoraWarning
from .adapters import (
    AdapterError,
    AdapterFormatError,
    AdapterMismatchError,
    AdapterNotFoundError,
    read_adapter,
)
from .config import LoraConfig
from .embedding import LoraEmbedding
from .linear import LoraLinear, swap_adapters
from .model import LoraModel, load_adapter
from .optim import SGD, AdamW, Optimizer
from .safetensors_io import open_weights
from .safetensors_write import save_weights
from .runtime import blas_info, get_num_threads, set_num_threads, share_threads_with_numpy, use_blas

__all__ = [
    "AdamW",
    "AdapterError",
    "AdapterFormatError",
    "AdapterMismatchError",
    "AdapterNotFoundError",
    "LoraConfig",
    "LoraModel",
    "LoraEmbedding",
    "LoraLinear",
    "LoraWarning",
    "Optimizer",
    "SGD",
    "__version__",
    "blas_info",
    "get_num_threads",
    "load_adapter",
    "open_weights",
    "read_adapter",
    "save_weights",
    "set_num_threads",
    "share_threads_with_numpy",
    "swap_adapters",
    "use_blas",
]
