"""`x · W` whose weight gradient is contracted as XLA's CPU backend computes it fastest.

jax differentiates `tensordot(x, w)` for `w` as `dot(g, x)` over the token dims, then transposes
the [out, in] result. XLA's CPU dots want the left operand's contracted dims last, so it writes g,
the large operand, transposed ([F, B*T]) from whichever fusion produced it. In the bench step
(configs/bench_tiny.py) that was the SiLU backward, written as `[704, 2048]` with reads strided
across the scan's residuals: 7.4% of the step. Here the weight gradient is `dot(x, g)`, which
gives [in, out] directly, so the transposed operand is x, the smaller one (for a LoRA adapter's B,
x · A with r columns). tests/model/test_contract.py checks values and gradients against jax's
own within float32 rounding.
"""

from __future__ import annotations

import jax


def _dot(lhs, rhs, lhs_dims, rhs_dims):
  """lhs · rhs over the given dims: lhs's other dims, then rhs's, in order."""
  return jax.lax.dot_general(lhs, rhs, ((tuple(lhs_dims), tuple(rhs_dims)), ((), ())))


def _over_batch(lhs, rhs, n_batch):
  """The sum over the leading n_batch (token) dims of both: a weight-shaped gradient."""
  return _dot(lhs, rhs, range(n_batch), range(n_batch))


def _contract(x, w, n_in):
  return _dot(x, w, range(x.ndim - n_in, x.ndim), range(n_in))


def _contract_fwd(x, w, n_in):
  return _contract(x, w, n_in), (x, w)


def _contract_bwd(n_in, residuals, g):
  x, w = residuals
  n_batch = x.ndim - n_in
  # dx [*batch, *in]: g's output dims against w's. dw [*in, *out]: x against g, always, even where
  # x is the wider (the MLP's down projection): transposing the smaller of the two measured 2%
  # slower on the bench step (683.7 against 667.8 ms).
  dx = _dot(g, w, range(n_batch, g.ndim), range(n_in, w.ndim))
  dw = _over_batch(x, g, n_batch)
  return dx.astype(x.dtype), dw.astype(w.dtype)


contract = jax.custom_vjp(_contract, nondiff_argnums=(2,))
contract.__doc__ = """tensordot(x, w, n_in): x [*batch, *in] · w [*in, *out] -> [*batch, *out]."""
contract.defvjp(_contract_fwd, _contract_bwd)


def _merged(w, a, b, n_in):
  """W + A · B, with B already scaled: the adapted layer's weight [*in, *out]."""
  return w + _dot(a, b, (n_in,), (0,))


def _lora_contract(x, w, a, b, n_in):
  return _contract(x, _merged(w, a, b, n_in), n_in)


def _lora_contract_fwd(x, w, a, b, n_in):
  return _lora_contract(x, w, a, b, n_in), (x, w, a, b)


def _lora_contract_bwd(n_in, residuals, g):
  x, w, a, b = residuals
  n_batch = x.ndim - n_in
  # W + A·B is formed again rather than saved: saved, it would be one more weight per layer held
  # from the forward to the backward.
  dx, dw = _contract_bwd(n_in, (x, _merged(w, a, b, n_in)), g)
  # The adapter's gradients through its rank: [*batch, r] products, never a [*in, *out] one (dw is
  # dropped by XLA when the base weight is frozen, as in a LoRA run).
  g_b = _dot(g, b, range(n_batch, g.ndim), range(1, b.ndim))
  da = _over_batch(x, g_b, n_batch)
  db = _over_batch(_contract(x, a, n_in), g, n_batch)
  return dx, dw, da.astype(a.dtype), db.astype(b.dtype)


lora_contract = jax.custom_vjp(_lora_contract, nondiff_argnums=(4,))
lora_contract.__doc__ = """x · (W + A · B) for x [*batch, *in], W [*in, *out], A [*in, r], B [r, *out].

One matmul of x instead of three (x · W, x · A, then · B) and no [*batch, *out] sum, in the
forward and in the backward's dx. Equal to the separate adapter path within float32 rounding; in
bfloat16 the small A · B would be rounded away against W, so callers use it only for float32
layers without adapter dropout.
"""
lora_contract.defvjp(_lora_contract_fwd, _lora_contract_bwd)
