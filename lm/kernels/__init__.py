"""Fused attention kernels (Pallas): flash attention with a Mosaic TPU and a GPU lowering."""

from lm.kernels.flash import default_lowering, flash_attention

__all__ = ['default_lowering', 'flash_attention']
