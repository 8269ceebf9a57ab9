"""Fused attention kernels (Pallas): flash attention with a Mosaic TPU and a GPU lowering."""

import importlib

from lm.model.kernels.flash import (block_backward, block_forward, block_tiles, default_lowering,
                                    flash_attention)

__all__ = ['block_backward', 'block_forward', 'block_tiles', 'default_lowering', 'flash_attention',
           'triton_available']


def triton_available() -> bool:
  """Whether Pallas's Triton (GPU) lowering imports: it is deprecated in JAX 0.11 and may be
  removed, and then the kernels' GPU paths fall back to XLA."""
  try:
    importlib.import_module('jax.experimental.pallas.triton')
  except ImportError:
    return False
  return True
