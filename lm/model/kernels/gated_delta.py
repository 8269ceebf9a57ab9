"""The gated delta rule: Gated DeltaNet's recurrence (Qwen3-Next, Qwen3.5 'linear_attention').

Per value head, with a state S [K, V] and per token t a query q_t, key k_t [K], value v_t [V],
log-decay g_t <= 0 and write strength beta_t in (0, 1):

    S <- exp(g_t) S;   S <- S + k_t (beta_t (v_t - S^T k_t))^T;   o_t = S^T (q_t K**-0.5)

Three forms with one signature, all float32 inside (output in v's dtype, state float32):
  `recurrent_gated_delta_rule`  token by token (lax.scan): the reference, and the decoding path.
  `chunk_gated_delta_rule`      transformers' `torch_chunk_gated_delta_rule` (chunks of 64 tokens,
                                a unit-triangular solve inside each chunk, a scan over chunks).
  `gated_delta_pallas`          the chunked form as one Pallas kernel (TPU and GPU lowerings;
                                interpret mode on CPU). Its gradient is the jnp chunked form's
                                (recomputed in the backward pass): no backward kernel yet.
`gated_delta(..., implementation=)` picks one as lm.model.attention picks attention kernels.

q and k are taken as they are: the L2 normalisation transformers does inside its kernel
(use_qk_l2norm_in_kernel=True) is `l2norm` here, applied by the module
(lm/model/mixers/gated_deltanet.py), so the decoding step and the kernels share one input. The
K**-0.5 query scale is applied here, as transformers does.

Grouped heads: q and k have G heads, v, g and beta H heads with H % G == 0; value head h reads
key head h // (H // G) (transformers' repeat_interleave). The kernels never materialise the
repeat except the jnp chunked form, which repeats before its einsums.

Packed documents: segment_ids_BT (0 = padding). The state is reset before the first token of
every document that follows another document's token (padding in between or not), and padding
tokens leave the state untouched (beta = 0, no decay), so a call that starts with padding still
continues `initial_state`. The chunked forms express a reset inside a chunk as masks: tokens of
different documents do not interact, and only tokens of the document carried in from the
previous chunk read the carried state.
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from lm.model.kernels import triton_available
from lm.model.kernels.tiles import NN, NT, TN, dot
from lm.sharding import target

IMPLEMENTATIONS = ('auto', 'xla', 'pallas')
HIGHEST = lax.Precision.HIGHEST  # float32 matmuls at full precision (no TF32 / bf16 passes)


def _unit_lower_solve_rows(system, rhs):
  """X with (I + strictly_lower(system)) X = rhs, by forward substitution over the C rows:
  X[i] = rhs[i] - N[i, :] X (N[i, j] = 0 for j >= i, so rows not yet solved contribute 0)."""
  n = jnp.tril(system, -1)

  def body(i, x):
    row = lax.dynamic_index_in_dim(n, i, axis=-2, keepdims=True)  # [..., 1, C]
    new = lax.dynamic_index_in_dim(rhs, i, axis=-2, keepdims=True) - jnp.einsum(
        '...ij,...jd->...id', row, x, precision=HIGHEST)
    return lax.dynamic_update_index_in_dim(x, new, i, axis=-2)

  return lax.fori_loop(0, rhs.shape[-2], body, rhs)


@jax.custom_vjp
def unit_lower_solve(system, rhs):
  """(I + strictly_lower(system))^-1 rhs over the last two axes, batched: what
  lax.linalg.triangular_solve(system, rhs, left_side=True, lower=True, unit_diagonal=True)
  computes. XLA:CPU runs that solve as LAPACK's trsm through jaxlib's FFI, whose batched form
  waits on the same thread pool it hands its work to: on a 2-core host two concurrent solves
  held both threads and the step hung for good (gdb: both pool threads in ParallelBatchMap's
  BlockingCounter::Wait). The CPU path runs this instead: a loop of matrix-vector rows, with a
  backward pass that solves the transposed system the same way (no per-row residuals)."""
  return _unit_lower_solve_rows(system, rhs)


def _solve_fwd(system, rhs):
  x = _unit_lower_solve_rows(system, rhs)
  return x, (system, x)


def _solve_bwd(saved, dx):
  system, x = saved
  # x = L^-1 rhs with L = I + N: d rhs = L^-T dx (an upper unit solve: the rows reversed make it
  # lower), d N = -(d rhs) x^T below the diagonal.
  n_t = jnp.swapaxes(jnp.tril(system, -1), -1, -2)  # J N^T J is strictly lower (J: reversal)
  drhs = jnp.flip(_unit_lower_solve_rows(jnp.flip(n_t, (-2, -1)), jnp.flip(dx, -2)), -2)
  dsystem = jnp.tril(-jnp.einsum('...id,...jd->...ij', drhs, x, precision=HIGHEST), -1)
  return dsystem, drhs


unit_lower_solve.defvjp(_solve_fwd, _solve_bwd)


def l2norm(x, eps=1e-6):
  """x / sqrt(sum(x^2) + eps) over the last axis, in float32 (transformers' and FLA's l2norm)."""
  x = x.astype(jnp.float32)
  return x * lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def document_resets(segment_ids_BT):
  """Bool [B, T]: the state is zeroed before token t. True where t is a real token (id != 0)
  whose latest earlier real token belongs to another document."""
  B, T = segment_ids_BT.shape
  real_BT = segment_ids_BT != 0
  last_real_BT = lax.cummax(jnp.where(real_BT, jnp.arange(T), -1), axis=1)
  prev_BT = jnp.pad(last_real_BT[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
  prev_seg_BT = jnp.where(prev_BT >= 0,
                          jnp.take_along_axis(segment_ids_BT, jnp.maximum(prev_BT, 0), axis=1), 0)
  return real_BT & (prev_seg_BT != 0) & (prev_seg_BT != segment_ids_BT)


def _gates(g_BTH, beta_BTH, segment_ids_BT):
  """float32 gates with padding made transparent, and the resets [B, T] (none without ids)."""
  g, beta = g_BTH.astype(jnp.float32), beta_BTH.astype(jnp.float32)
  if segment_ids_BT is None:
    return g, beta, jnp.zeros(g.shape[:2], bool)
  pad_BT1 = (segment_ids_BT == 0)[:, :, None]
  g, beta = jnp.where(pad_BT1, 0.0, g), jnp.where(pad_BT1, 0.0, beta)
  return g, beta, document_resets(segment_ids_BT)


def _prepare(q, k, v, g, beta, segment_ids_BT):
  """float32 inputs, q scaled by K**-0.5, padding made transparent; resets [B, T]."""
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  return (q * q.shape[-1] ** -0.5, k, v, *_gates(g, beta, segment_ids_BT))


def _check(q, k, v, g, beta, initial_state):
  B, T, G, K = q.shape
  H, V = v.shape[2:]
  if k.shape != q.shape or v.shape[:2] != (B, T) or H % G or g.shape != (B, T, H) or (
      beta.shape != (B, T, H)):
    raise ValueError(f'bad shapes q={q.shape} k={k.shape} v={v.shape} g={g.shape} '
                     f'beta={beta.shape}')
  if initial_state is not None and initial_state.shape != (B, H, K, V):
    raise ValueError(f'initial_state {initial_state.shape} != {(B, H, K, V)}')
  return B, T, G, H, K, V


def recurrent_gated_delta_rule(q_BTGK, k_BTGK, v_BTHV, g_BTH, beta_BTH, *, chunk_size=64,
                               initial_state=None, segment_ids_BT=None):
  """Token by token. Returns (out [B, T, H, V] in v's dtype, final state [B, H, K, V] float32).
  chunk_size is unused (one signature for every form)."""
  del chunk_size
  B, T, G, H, K, V = _check(q_BTGK, k_BTGK, v_BTHV, g_BTH, beta_BTH, initial_state)
  q, k, v, g, beta, reset_BT = _prepare(q_BTGK, k_BTGK, v_BTHV, g_BTH, beta_BTH, segment_ids_BT)
  R = H // G
  q, k = jnp.repeat(q, R, axis=2), jnp.repeat(k, R, axis=2)
  state = (jnp.zeros((B, H, K, V), jnp.float32) if initial_state is None
           else initial_state.astype(jnp.float32))

  def step(S_BHKV, xs):
    q_BHK, k_BHK, v_BHV, g_BH, beta_BH, reset_B = xs
    decay_BH = jnp.where(reset_B[:, None], 0.0, jnp.exp(g_BH))
    S_BHKV = S_BHKV * decay_BH[..., None, None]
    predicted_BHV = jnp.einsum('bhk,bhkv->bhv', k_BHK, S_BHKV, precision=HIGHEST)
    delta_BHV = (v_BHV - predicted_BHV) * beta_BH[..., None]
    S_BHKV = S_BHKV + k_BHK[..., None] * delta_BHV[..., None, :]
    return S_BHKV, jnp.einsum('bhk,bhkv->bhv', q_BHK, S_BHKV, precision=HIGHEST)

  time_major = lambda x: jnp.moveaxis(x, 1, 0)
  state, out_TBHV = lax.scan(step, state, tuple(map(time_major, (q, k, v, g, beta, reset_BT))))
  return time_major(out_TBHV).astype(v_BTHV.dtype), state


def chunk_inputs(q_BTGK, k_BTGK, v_BTHV, g_BTH, beta_BTH, segment_ids_BT, chunk_size):
  """The jnp chunked form's inputs, float32, heads first and T padded to chunks of C:
  q, k [B, G, N, C, K], v [B, H, N, C, V], and per token: cum [B, H, N, C] (cumulative
  log-decay within the chunk), beta [B, H, N, C] and doc [B, N, C] (documents started since
  the chunk began: 0 = the document carried in).
  Padding to whole chunks is transparent (beta = 0, g = 0), as in transformers."""
  q, k, v, g, beta, reset_BT = _prepare(q_BTGK, k_BTGK, v_BTHV, g_BTH, beta_BTH, segment_ids_BT)
  B, T = g.shape[:2]
  C = chunk_size
  pad = -T % C
  N = (T + pad) // C
  widths = lambda x: ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2)
  q, k, v, g, beta, reset_BT = (jnp.pad(x, widths(x)) for x in (q, k, v, g, beta, reset_BT))
  chunks = lambda x: jnp.moveaxis(x.reshape(B, N, C, *x.shape[2:]), (3,), (1,))
  q, k, v = (chunks(x) for x in (q, k, v))  # [B, heads, N, C, dim]
  g, beta = (jnp.moveaxis(x.reshape(B, N, C, -1), 3, 1) for x in (g, beta))  # [B, H, N, C]
  doc_BNC = jnp.cumsum(reset_BT.reshape(B, N, C).astype(jnp.int32), axis=-1)
  return q, k, v, jnp.cumsum(g, axis=-1), beta, doc_BNC


def chunk_gated_delta_rule(q_BTGK, k_BTGK, v_BTHV, g_BTH, beta_BTH, *, chunk_size=64,
                           initial_state=None, segment_ids_BT=None):
  """transformers' torch_chunk_gated_delta_rule (its l2norm aside, see the module docstring),
  with packed-document masks. Returns (out [B, T, H, V] in v's dtype, final state [B, H, K, V]
  float32)."""
  B, T, G, H, K, V = _check(q_BTGK, k_BTGK, v_BTHV, g_BTH, beta_BTH, initial_state)
  q, k, v, cum, beta, doc_BNC = chunk_inputs(q_BTGK, k_BTGK, v_BTHV, g_BTH, beta_BTH,
                                             segment_ids_BT, chunk_size)
  q, k = jnp.repeat(q, H // G, axis=1), jnp.repeat(k, H // G, axis=1)
  C = chunk_size
  i, j = jnp.arange(C)[:, None], jnp.arange(C)[None, :]
  # decay[i, j] = exp(cum_i - cum_j): what the state decays by from token j to token i, zero
  # above the diagonal and across documents (masked before exp: above it the exponent is > 0).
  same_BNCC = doc_BNC[..., :, None] == doc_BNC[..., None, :]
  visible_B1NCC = ((j <= i) & same_BNCC)[:, None]
  decay = jnp.exp(jnp.where(visible_B1NCC, cum[..., :, None] - cum[..., None, :], -jnp.inf))
  k_beta = k * beta[..., None]
  mm = functools.partial(jnp.einsum, precision=HIGHEST)
  # The UT transform: (I + strictly_lower(beta k k^T . decay)) u = rhs turns the chunk's delta
  # rule updates into matmuls; transformers solves the same unit-triangular system.
  system = mm('...ik,...jk->...ij', k_beta, k) * decay
  carried = (doc_BNC == 0)[:, None]  # tokens of the document carried in from the last chunk
  decayed_k_beta = k_beta * (jnp.exp(cum) * carried)[..., None]
  if target()[0] == 'cpu':  # LAPACK's batched trsm can deadlock XLA:CPU's pool (unit_lower_solve)
    solve = unit_lower_solve
  else:
    solve = functools.partial(lax.linalg.triangular_solve, left_side=True, lower=True,
                              unit_diagonal=True)
  new_v = solve(system, v * beta[..., None])  # [B, H, N, C, V]
  k_cumdecay = solve(system, decayed_k_beta)  # [B, H, N, C, K]
  attn = mm('...ik,...jk->...ij', q, k) * decay
  q_carried = q * (jnp.exp(cum) * carried)[..., None]
  # The state at the chunk's end holds the last token's document only.
  last_doc = doc_BNC[..., -1:]
  cum_last = cum[..., -1:]
  k_to_end = k * (jnp.exp(cum_last - cum) * (doc_BNC == last_doc)[:, None])[..., None]
  chunk_decay = jnp.exp(cum_last[..., 0]) * (last_doc[:, None, :, 0] == 0)  # [B, H, N]

  def step(S_BHKV, xs):
    new_v, k_cumdecay, q_carried, attn, k_to_end, chunk_decay = xs
    v_new = new_v - mm('bhck,bhkv->bhcv', k_cumdecay, S_BHKV)
    out = mm('bhck,bhkv->bhcv', q_carried, S_BHKV) + mm('bhij,bhjv->bhiv', attn, v_new)
    S_BHKV = S_BHKV * chunk_decay[..., None, None] + mm('bhck,bhcv->bhkv', k_to_end, v_new)
    return S_BHKV, out

  state = (jnp.zeros((B, H, K, V), jnp.float32) if initial_state is None
           else initial_state.astype(jnp.float32))
  chunk_major = lambda x: jnp.moveaxis(x, 2, 0)
  state, out_NBHCV = lax.scan(step, state, tuple(map(chunk_major, (
      new_v, k_cumdecay, q_carried, attn, k_to_end, chunk_decay))))
  N = out_NBHCV.shape[0]
  out_BTHV = jnp.moveaxis(out_NBHCV, 0, 2).reshape(B, H, N * C, V)[:, :, :T].swapaxes(1, 2)
  return out_BTHV.astype(v_BTHV.dtype), state


# ---- Pallas: the chunked form as one kernel ------------------------------------------------
#
# Each program walks the chunks of one (batch, value head) in order, carrying the state [K, V]:
# on TPU the chunk axis is the innermost ('arbitrary') grid axis and the state lives in VMEM
# scratch; on GPU one program loops over the chunks (Triton programs share no scratch) and the
# state stays in registers, split over value blocks of at most GPU_VALUE_BLOCK columns.
# Per-token scalars come as rows [1, C] of one [8, C] block per chunk (cumulative log-decay,
# beta, document index; eight rows for the TPU's sublane tiling) and are turned into columns
# inside the kernel by a masked lane reduction, so no layout ever has a minor dimension of 1.

GPU_VALUE_BLOCK = 64
AUX_ROWS = 8  # rows of the per-chunk scalar block: 0 cumulative log-decay, 1 beta, 2 document


def _column(row_1C, eye_CC):
  """[1, C] -> [C, 1] without a transpose: a masked sum over lanes."""
  return jnp.sum(jnp.where(eye_CC, row_1C, 0.0), axis=1, keepdims=True)


def _unit_lower_inverse(nt_CC, rows, cols):
  """(I + N)^-1 for N strictly lower triangular, given N^T, by forward substitution:
  X[i] = e_i - N[i, :] X, one row per step. N[i, :] is column i of N^T, so every step is
  elementwise work and reductions (no dynamic slicing, which Triton values do not have)."""
  eye = (rows == cols).astype(jnp.float32)

  def body(i, x_CC):
    n_i_C1 = jnp.sum(jnp.where(cols == i, nt_CC, 0.0), axis=1, keepdims=True)  # N[i, j] at row j
    r_1C = jnp.sum(n_i_C1 * x_CC, axis=0, keepdims=True)
    return jnp.where(rows == i, eye - r_1C, x_CC)

  return lax.fori_loop(1, nt_CC.shape[0], body, eye)


def _chunk_step(q_CK, k_CK, v_CV, cum_1C, beta_1C, doc_1C, S_KV, scale):
  """One chunk of chunk_gated_delta_rule's math, its two solves folded into one:
  (out [C, V], the state after the chunk [K, V])."""
  C = q_CK.shape[0]
  q_CK = q_CK.astype(jnp.float32) * scale
  k_CK, v_CV = k_CK.astype(jnp.float32), v_CV.astype(jnp.float32)
  rows = lax.broadcasted_iota(jnp.int32, (C, C), 0)
  cols = lax.broadcasted_iota(jnp.int32, (C, C), 1)
  eye = rows == cols
  cum_C1, beta_C1, doc_C1 = (_column(x, eye) for x in (cum_1C, beta_1C, doc_1C))
  # decay[i, j] = exp(cum_i - cum_j) on and below the diagonal within one document; decay^T too.
  same = doc_C1 == doc_1C
  visible = (cols <= rows) & same
  decay = jnp.where(visible, jnp.exp(jnp.where(visible, cum_C1 - cum_1C, 0.0)), 0.0)
  visible_t = (rows <= cols) & same
  decay_t = jnp.where(visible_t, jnp.exp(jnp.where(visible_t, cum_1C - cum_C1, 0.0)), 0.0)
  k_beta = k_CK * beta_C1
  n_t = jnp.where(rows < cols, dot(k_CK, k_beta, NT) * decay_t, 0.0)  # N^T, N = tril(βkk^T·decay)
  inverse = _unit_lower_inverse(n_t, rows, cols)
  carried_C1 = jnp.where(doc_C1 == 0, jnp.exp(cum_C1), 0.0)  # reads of the carried-in state
  # v_new = (I + N)^-1 (v β - (k β e^cum) S): one solve for what transformers solves twice.
  v_new = dot(inverse, v_CV * beta_C1 - dot(k_beta * carried_C1, S_KV, NN), NN)
  out = dot(q_CK * carried_C1, S_KV, NN) + dot(dot(q_CK, k_CK, NT) * decay, v_new, NN)
  last = lax.broadcasted_iota(jnp.int32, (1, C), 1) == C - 1
  cum_last = jnp.sum(jnp.where(last, cum_1C, 0.0), axis=1, keepdims=True)  # [1, 1]
  doc_last = jnp.sum(jnp.where(last, doc_1C, 0.0), axis=1, keepdims=True)
  k_to_end = k_CK * jnp.where(doc_C1 == doc_last, jnp.exp(cum_last - cum_C1), 0.0)
  chunk_decay = jnp.where(doc_last == 0, jnp.exp(cum_last), 0.0)
  return out, S_KV * chunk_decay + dot(k_to_end, v_new, TN)


def _tpu_kernel(q_ref, k_ref, v_ref, aux_ref, s0_ref, o_ref, s_ref, state, *, scale):
  n = pl.program_id(2)

  @pl.when(n == 0)
  def _():
    state[...] = s0_ref[...]

  out, state[...] = _chunk_step(q_ref[...], k_ref[...], v_ref[...], aux_ref[0:1, :],
                                aux_ref[1:2, :], aux_ref[2:3, :], state[...], scale)
  o_ref[...] = out.astype(o_ref.dtype)

  @pl.when(n == pl.num_programs(2) - 1)
  def _():
    s_ref[...] = state[...]


def _gpu_kernel(q_ref, k_ref, v_ref, aux_ref, s0_ref, o_ref, s_ref, *, scale, C, N):

  def body(n, S_KV):
    tokens = pl.ds(n * C, C)
    row = lambda r: aux_ref[n, pl.ds(r, 1), :]
    out, S_KV = _chunk_step(q_ref[tokens, :], k_ref[tokens, :], v_ref[tokens, :], row(0), row(1),
                            row(2), S_KV, scale)
    o_ref[tokens, :] = out.astype(o_ref.dtype)
    return S_KV

  s_ref[...] = lax.fori_loop(0, N, body, s0_ref[...].astype(jnp.float32))


def _pallas_forward(q, k, v, g, beta, s0, seg, chunk_size, lowering, interpret):
  B, T, G, K = q.shape
  H, V = v.shape[2:]
  C, R = chunk_size, H // G
  g, beta, reset_BT = _gates(g, beta, seg)
  pad = -T % C
  N = (T + pad) // C
  widths = lambda x: ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2)
  q, k, v, g, beta, reset_BT = (jnp.pad(x, widths(x)) for x in (q, k, v, g, beta, reset_BT))
  per_chunk = lambda x_BTH: jnp.moveaxis(x_BTH.reshape(B, N, C, H), 3, 1)  # [B, H, N, C]
  doc_BNC = jnp.cumsum(reset_BT.reshape(B, N, C).astype(jnp.float32), axis=-1)
  rows = [jnp.cumsum(per_chunk(g), axis=-1), per_chunk(beta),
          jnp.broadcast_to(doc_BNC[:, None], (B, H, N, C))]
  zeros = jnp.zeros((B, H, N, C), jnp.float32)
  aux = jnp.stack(rows + [zeros] * (AUX_ROWS - len(rows)), axis=3)  # [B, H, N, 8, C]
  scale = K ** -0.5
  if lowering == 'tpu':
    heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # blocks' minor dims (chunk, head dim)
    out_BHTV, state = pl.pallas_call(
        functools.partial(_tpu_kernel, scale=scale), grid=(B, H, N),
        in_specs=[
            pl.BlockSpec((None, None, C, K), lambda b, h, n: (b, lax.div(h, R), n, 0)),
            pl.BlockSpec((None, None, C, K), lambda b, h, n: (b, lax.div(h, R), n, 0)),
            pl.BlockSpec((None, None, C, V), lambda b, h, n: (b, h, n, 0)),
            pl.BlockSpec((None, None, None, AUX_ROWS, C), lambda b, h, n: (b, h, n, 0, 0)),
            pl.BlockSpec((None, None, K, V), lambda b, h, n: (b, h, 0, 0))],
        out_specs=[pl.BlockSpec((None, None, C, V), lambda b, h, n: (b, h, n, 0)),
                   pl.BlockSpec((None, None, K, V), lambda b, h, n: (b, h, 0, 0))],
        out_shape=[jax.ShapeDtypeStruct((B, H, N * C, V), v.dtype),
                   jax.ShapeDtypeStruct((B, H, K, V), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((K, V), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=('parallel', 'parallel', 'arbitrary')),
        interpret=interpret, name='lm_gated_delta_fwd',
    )(heads_first(q), heads_first(k), heads_first(v), aux, s0)
    return heads_first(out_BHTV)[:, :T], state
  bv = min(V, GPU_VALUE_BLOCK)
  if V % bv:
    raise ValueError(f'value head dim {V} is not a multiple of {bv}')
  params = None
  if not interpret:
    pltriton = importlib.import_module('jax.experimental.pallas.triton')
    params = pltriton.CompilerParams(num_warps=4, num_stages=1)
  out, state = pl.pallas_call(
      functools.partial(_gpu_kernel, scale=scale, C=C, N=N), grid=(B, H, V // bv),
      in_specs=[
          pl.BlockSpec((None, N * C, None, K), lambda b, h, j: (b, 0, lax.div(h, R), 0)),
          pl.BlockSpec((None, N * C, None, K), lambda b, h, j: (b, 0, lax.div(h, R), 0)),
          pl.BlockSpec((None, N * C, None, bv), lambda b, h, j: (b, 0, h, j)),
          pl.BlockSpec((None, None, N, AUX_ROWS, C), lambda b, h, j: (b, h, 0, 0, 0)),
          pl.BlockSpec((None, None, K, bv), lambda b, h, j: (b, h, 0, j))],
      out_specs=[pl.BlockSpec((None, N * C, None, bv), lambda b, h, j: (b, 0, h, j)),
                 pl.BlockSpec((None, None, K, bv), lambda b, h, j: (b, h, 0, j))],
      out_shape=[jax.ShapeDtypeStruct((B, N * C, H, V), v.dtype),
                 jax.ShapeDtypeStruct((B, H, K, V), jnp.float32)],
      compiler_params=params, interpret=interpret, name='lm_gated_delta_fwd',
  )(q, k, v, aux, s0)
  return out[:, :T], state


def default_lowering():
  """'tpu' on TPU, else 'gpu' (the Triton-style kernel; also the CPU interpret mode's)."""
  return 'tpu' if target()[0] == 'tpu' else 'gpu'


def gated_delta_pallas(q_BTGK, k_BTGK, v_BTHV, g_BTH, beta_BTH, *, chunk_size=64,
                       initial_state=None, segment_ids_BT=None, lowering=None, interpret=None):
  """The chunked form as a Pallas kernel; same arguments and results as chunk_gated_delta_rule.
  lowering: 'tpu' | 'gpu' (default: per backend); interpret defaults to True on CPU.

  The backward pass is the jnp chunked form's VJP, recomputed from the inputs (custom_vjp):
  correct gradients at the jnp form's speed and memory; a backward kernel is still to write."""
  B, T, G, H, K, V = _check(q_BTGK, k_BTGK, v_BTHV, g_BTH, beta_BTH, initial_state)
  s0 = (jnp.zeros((B, H, K, V), jnp.float32) if initial_state is None
        else initial_state.astype(jnp.float32))
  lowering = lowering or default_lowering()
  interpret = target()[0] == 'cpu' if interpret is None else interpret
  return _pallas(q_BTGK, k_BTGK, v_BTHV, g_BTH, beta_BTH, s0, segment_ids_BT,
                 (chunk_size, lowering, bool(interpret)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _pallas(q, k, v, g, beta, s0, seg, static):
  return _pallas_forward(q, k, v, g, beta, s0, seg, *static)


def _pallas_fwd(q, k, v, g, beta, s0, seg, static):
  return _pallas_forward(q, k, v, g, beta, s0, seg, *static), (q, k, v, g, beta, s0, seg)


def _pallas_bwd(static, residuals, cotangents):
  *diff, seg = residuals
  reference = lambda q, k, v, g, beta, s0: chunk_gated_delta_rule(
      q, k, v, g, beta, chunk_size=static[0], initial_state=s0, segment_ids_BT=seg)
  _, vjp = jax.vjp(reference, *diff)
  return (*vjp(cotangents), None)


_pallas.defvjp(_pallas_fwd, _pallas_bwd)


# ---- Dispatch ------------------------------------------------------------------------------

def pallas_supported(k_BTGK, v_BTHV) -> bool:
  """Whether gated_delta_pallas can run on the backend being traced for."""
  backend, _ = target()
  if backend == 'gpu':
    if not triton_available():
      return False
    pow2 = lambda n: n & (n - 1) == 0 and n >= 16  # Triton tiles: powers of two, dots >= 16
    return pow2(k_BTGK.shape[-1]) and pow2(min(v_BTHV.shape[-1], GPU_VALUE_BLOCK))
  return backend == 'tpu'


def choose_implementation(k_BTGK, v_BTHV) -> str:
  """What 'auto' runs: Pallas on TPU/GPU where it applies, else the jnp chunked form.
  CPU stays on jnp (Pallas runs there only in the slow interpret mode). On several devices the
  kernel runs inside a shard_map over the mesh in context (a pallas_call is not partitioned by
  the SPMD compiler); with no mesh in context it cannot, so 'auto' stays on jnp there."""
  _, devices = target()
  in_mesh = not jax.sharding.get_abstract_mesh().empty
  if (devices == 1 or in_mesh) and pallas_supported(k_BTGK, v_BTHV):
    return 'pallas'
  return 'xla'


def sharded_gated_delta_pallas(q_BTGK, k_BTGK, v_BTHV, g_BTH, beta_BTH, *, mesh, chunk_size=64,
                               initial_state=None, segment_ids_BT=None):
  """The Pallas kernel on each device's block: a shard_map over the batch axes (data, fsdp) and
  the head axis (tensor; only when it divides the key heads, so groups stay whole). The
  sequence is never split: other mesh axes (context included) see all of it."""
  from lm.model import attention  # pylint: disable=import-outside-toplevel (a layer above kernels)
  b, h = attention._batch_and_head_axes(mesh, v_BTHV, k_BTGK)  # pylint: disable=protected-access
  P = jax.sharding.PartitionSpec
  heads, gates, state, seg = P(b, None, h, None), P(b, None, h), P(b, h, None, None), P(b, None)
  optional = [(x, spec) for x, spec in ((initial_state, state), (segment_ids_BT, seg))
              if x is not None]

  def body(q, k, v, g, beta, *rest):
    rest = iter(rest)
    s0 = next(rest) if initial_state is not None else None
    ids = next(rest) if segment_ids_BT is not None else None
    return gated_delta_pallas(q, k, v, g, beta, chunk_size=chunk_size, initial_state=s0,
                              segment_ids_BT=ids)

  return jax.shard_map(
      body, mesh=mesh, in_specs=(heads, heads, heads, gates, gates, *(s for _, s in optional)),
      out_specs=(heads, state), check_vma=False,
  )(q_BTGK, k_BTGK, v_BTHV, g_BTH, beta_BTH, *(x for x, _ in optional))


def gated_delta(q_BTGK, k_BTGK, v_BTHV, g_BTH, beta_BTH, *, chunk_size=64, initial_state=None,
                segment_ids_BT=None, implementation='auto'):
  """The chunked gated delta rule by `implementation`: 'xla' (jnp), 'pallas' or 'auto'."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'gated delta implementation={implementation!r}; choose one of '
                     f'{IMPLEMENTATIONS}')
  if implementation == 'auto':
    implementation = choose_implementation(k_BTGK, v_BTHV)
  kwargs = dict(chunk_size=chunk_size, initial_state=initial_state, segment_ids_BT=segment_ids_BT)
  if implementation == 'xla':
    return chunk_gated_delta_rule(q_BTGK, k_BTGK, v_BTHV, g_BTH, beta_BTH, **kwargs)
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.size > 1:
    return sharded_gated_delta_pallas(q_BTGK, k_BTGK, v_BTHV, g_BTH, beta_BTH, mesh=mesh, **kwargs)
  return gated_delta_pallas(q_BTGK, k_BTGK, v_BTHV, g_BTH, beta_BTH, **kwargs)
