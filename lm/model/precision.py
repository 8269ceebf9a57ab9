"""A layer's float32 weights cast to the compute dtype inside the layer loop, where XLA keeps them.

Written as `w.astype(bfloat16)`, the cast is a `convert`. XLA's TPU compiler moves that convert
ahead of the layer scan's dynamic-slice (and ahead of the FSDP all-gather, which halves its traffic)
and then hoists it out of the loop: one bfloat16 copy of every layer's weights is made before the
forward loop and stays live through the backward one, 3.3 GiB per chip for the 8B step in
docs/pretraining.md. `to_compute_dtype` rounds with integer operations on the bits instead, which
no pass moves across the slice, so only the layer being computed has a bfloat16 copy.

The result is bit-identical to `astype` (round to nearest, ties to even; infinities stay, NaN stays
NaN), and so is the gradient: the cotangent cast back to float32
(tests/model/test_precision.py). Any other pair of dtypes is a plain `astype`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def to_compute_dtype(w: jax.Array, dtype) -> jax.Array:
  """`w.astype(dtype)`, computed so that a float32 -> bfloat16 cast stays where it is written."""
  if w.dtype == jnp.float32 and jnp.dtype(dtype) == jnp.bfloat16:
    return _float32_to_bfloat16(w)
  return w.astype(dtype)


def _round_to_bfloat16(w):
  bits = jax.lax.bitcast_convert_type(w, jnp.uint32)
  # Round to nearest even on the 16 bits that go: add 0x7FFF plus the lowest kept bit, truncate.
  # A carry out of the mantissa moves into the exponent, which is also what rounding does; the
  # largest finite values round up to infinity as `convert` does.
  rounded = (bits + jnp.uint32(0x7FFF) + ((bits >> 16) & jnp.uint32(1))) >> 16
  rounded = jnp.where(jnp.isnan(w), jnp.uint32(0x7FC0), rounded)  # the sum could carry a NaN into the sign
  return jax.lax.bitcast_convert_type(rounded.astype(jnp.uint16), jnp.bfloat16)


# The gradient of integer operations is zero; the cast's is the cotangent cast back, as for astype.
_float32_to_bfloat16 = jax.custom_vjp(_round_to_bfloat16)
_float32_to_bfloat16.defvjp(lambda w: (_round_to_bfloat16(w), None),
                            lambda _, cotangent: (cotangent.astype(jnp.float32),))
