"""mae_kernels: drop-in Triton kernels for masked-autoencoder training.

Each op has Triton forward/backward kernels, a plain-torch reference in the same file, and a
dispatcher (Triton on CUDA or under TRITON_INTERPRET=1, the reference otherwise; override with
``MAE_KERNELS_BACKEND=torch|triton`` or ``with mae_kernels.backend("torch"):``).
This package stands alone: it needs torch and triton, nothing from avfmae (``pip install ./kernels``).
``mae_kernels.integrations.mae`` / ``.videomae`` adapt the conventions of MAE, VideoMAE and HiCMAE
(see docs/drop-in.md); ``mask_to_indices`` turns a boolean mask into the positions the ops take,
``indices_to_mask`` back.
"""

import torch as _torch

from . import _requirements

_requirements.check_torch(_torch.__version__)

from .assemble_decoder_tokens import assemble_decoder_tokens  # noqa: E402
from .dispatch import backend  # noqa: E402
from .gather_tokens import gather_tokens  # noqa: E402
from .grouped_attention import grouped_attention  # noqa: E402
from .masked_mse_loss import masked_mse_loss  # noqa: E402
from .masks import indices_to_mask, mask_to_indices  # noqa: E402

__all__ = [
    "grouped_attention", "gather_tokens", "assemble_decoder_tokens", "masked_mse_loss", "mask_to_indices",
    "indices_to_mask", "backend",
]
__version__ = "0.1.0"
