"""Fused attention kernels (Pallas): flash attention with a Mosaic TPU and a GPU lowering."""

from lm.model.kernels.flash import default_lowering, flash_attention

__all__ = ['default_lowering', 'flash_attention']
