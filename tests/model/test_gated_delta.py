"""The gated delta rule (lm.model.kernels.gated_delta): chunked == recurrent == Pallas, packed
documents == documents run alone, and the kernel compiles for TPU and GPU targets.

Tolerances are float32 (all three forms compute in float32; only the summation order differs):
outputs and states 1e-5 absolute (inputs of unit scale), gradients 1e-5 relative to the largest
reference entry. The reference of the references is transformers' own torch_chunk_gated_delta_rule.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.model.kernels import gated_delta as gd

TOL = 1e-5


def inputs(B, T, G, H, K, V, seed=0, dtype=jnp.float32):
  """Random inputs as the module makes them: unit-norm q/k, g <= 0, beta in (0, 1)."""
  ks = jax.random.split(jax.random.key(seed), 6)
  q_BTGK = gd.l2norm(jax.random.normal(ks[0], (B, T, G, K))).astype(dtype)
  k_BTGK = gd.l2norm(jax.random.normal(ks[1], (B, T, G, K))).astype(dtype)
  v_BTHV = jax.random.normal(ks[2], (B, T, H, V)).astype(dtype)
  g_BTH = -jax.nn.softplus(jax.random.normal(ks[3], (B, T, H)))
  beta_BTH = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H)))
  state_BHKV = jax.random.normal(ks[5], (B, H, K, V))
  return q_BTGK, k_BTGK, v_BTHV, g_BTH, beta_BTH, state_BHKV


def packed(B, lengths):
  """B equal rows of (segment id, length) runs; id 0 is padding."""
  row = np.concatenate([np.full(n, i) for i, n in lengths])
  return jnp.asarray(np.broadcast_to(row, (B, row.size)), jnp.int32)


def max_err(a, b):
  return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))


def pallas(lowering):
  def run(*args, **kwargs):
    return gd.gated_delta_pallas(*args, lowering=lowering, interpret=True, **kwargs)
  return run


FORMS = {'chunk': gd.chunk_gated_delta_rule, 'pallas_gpu': pallas('gpu'),
         'pallas_tpu': pallas('tpu')}


@pytest.mark.parametrize('T', [1, 64, 150])
def test_chunked_matches_recurrent(T):
  """Any length (padded to whole chunks inside), grouped heads, a carried-in state."""
  q, k, v, g, beta, state = inputs(2, T, 2, 4, 16, 8)
  out, final = jax.jit(gd.chunk_gated_delta_rule)(q, k, v, g, beta, initial_state=state)
  want_out, want_final = jax.jit(gd.recurrent_gated_delta_rule)(q, k, v, g, beta,
                                                                initial_state=state)
  assert out.shape == (2, T, 4, 8) and final.shape == (2, 4, 16, 8)
  errs = max_err(out, want_out), max_err(final, want_final)
  print(f'T={T}: chunked vs recurrent: output {errs[0]:.1e}, state {errs[1]:.1e}')
  assert max(errs) < TOL, errs


def test_strong_decay_stays_finite():
  """Decays down to exp(-84) per token (cumulative log-decays near -5000 within a chunk): the
  chunked forms mask before exponentiating, so outputs and gradients stay finite and exact."""
  q, k, v, g, beta, state = inputs(1, 70, 1, 2, 16, 8)
  g = 30.0 * g
  want = jax.jit(gd.recurrent_gated_delta_rule)(q, k, v, g, beta, initial_state=state)
  for name in ('chunk', 'pallas_tpu'):
    out, final = jax.jit(FORMS[name])(q, k, v, g, beta, initial_state=state)
    assert max(max_err(out, want[0]), max_err(final, want[1])) < TOL
  dg = jax.jit(jax.grad(lambda g: gd.chunk_gated_delta_rule(q, k, v, g, beta)[0].sum()))(g)
  assert bool(jnp.all(jnp.isfinite(dg)))


def test_chunked_matches_transformers():
  """Against torch_chunk_gated_delta_rule itself (use_qk_l2norm_in_kernel: our q/k are already
  unit-norm, so its l2norm changes them by rounding only)."""
  torch = pytest.importorskip('torch')
  qwen3_next = pytest.importorskip('transformers.models.qwen3_next.modeling_qwen3_next')
  q, k, v, g, beta, state = inputs(1, 100, 2, 4, 16, 8)
  out, final = gd.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=state)
  t = lambda x: torch.from_numpy(np.asarray(x))
  want_out, want_final = qwen3_next.torch_chunk_gated_delta_rule(
      t(q), t(k), t(v), t(g), t(beta), initial_state=t(state), output_final_state=True,
      use_qk_l2norm_in_kernel=True)
  errs = max_err(out, want_out.numpy()), max_err(final, want_final.numpy())
  print(f'chunked vs transformers: output {errs[0]:.1e}, state {errs[1]:.1e}')
  assert max(errs) < TOL, errs


@pytest.mark.parametrize('form', ['recurrent', *FORMS])
def test_packed_equals_separate(form):
  """A packed row == each document alone from a zero state; padding between documents and at
  the end changes nothing, so the final state is the last document's."""
  fn = gd.recurrent_gated_delta_rule if form == 'recurrent' else FORMS[form]
  layout = [(1, 40), (2, 70), (0, 10), (3, 30), (0, 6)]  # documents across chunk boundaries
  seg = packed(1, layout)
  q, k, v, g, beta, _ = inputs(1, seg.shape[1], 1, 2, 16, 8)
  out, final = jax.jit(fn)(q, k, v, g, beta, segment_ids_BT=seg)
  start, worst = 0, 0.0
  for doc, n in layout:
    if doc:
      part = lambda x: x[:, start:start + n]
      alone, alone_final = jax.jit(gd.recurrent_gated_delta_rule)(*map(part, (q, k, v, g, beta)))
      worst = max(worst, max_err(out[:, start:start + n], alone))
    start += n
  worst = max(worst, max_err(final, alone_final))  # the last document's state
  print(f'{form}: packed vs separate {worst:.1e}')
  assert worst < TOL


@pytest.mark.parametrize('form', ['recurrent', 'chunk'])
def test_leading_padding_continues_the_state(form):
  """Padding before a continuation (a left-padded batch) leaves the carried state in force."""
  fn = jax.jit(gd.recurrent_gated_delta_rule if form == 'recurrent' else FORMS[form])
  q, k, v, g, beta, state = inputs(1, 20, 1, 2, 16, 8)
  seg = packed(1, [(0, 5), (1, 15)])
  out, final = fn(q, k, v, g, beta, initial_state=state, segment_ids_BT=seg)
  alone, alone_final = fn(*(x[:, 5:] for x in (q, k, v, g, beta)), initial_state=state)
  assert max(max_err(out[:, 5:], alone), max_err(final, alone_final)) < TOL


@pytest.mark.parametrize('lowering', ['gpu', 'tpu'])
def test_pallas_matches_jnp(lowering):
  """Interpret mode, packed rows, grouped heads, a carried-in state; bf16 inputs through the
  TPU lowering only (the casts are in the chunk step both lowerings share)."""
  seg = packed(1, [(1, 50), (2, 40), (0, 10)])
  q, k, v, g, beta, state = inputs(1, seg.shape[1], 1, 2, 16, 32)
  kw = dict(initial_state=state, segment_ids_BT=seg)
  run = lambda *a: (jax.jit(FORMS[f'pallas_{lowering}'])(*a, **kw),
                    jax.jit(gd.chunk_gated_delta_rule)(*a, **kw))
  (out, final), (want_out, want_final) = run(q, k, v, g, beta)
  errs = max_err(out, want_out), max_err(final, want_final)
  print(f'pallas {lowering} vs jnp: output {errs[0]:.1e}, state {errs[1]:.1e}')
  assert max(errs) < TOL, errs
  if lowering == 'gpu':
    return
  bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  (out, final), (want_out, want_final) = run(*bf16, g, beta)
  assert out.dtype == jnp.bfloat16 and final.dtype == jnp.float32
  # Both compute in float32 from the same bf16 inputs: they differ by the output's rounding.
  assert max_err(out, want_out) <= 2 ** -8 * float(jnp.max(jnp.abs(want_out)))
  assert max_err(final, want_final) < TOL


def test_gradients_chunked_match_recurrent():
  """d(out, state) / d(q, k, v, g, beta, initial state) agree between the forms, packed; the
  Pallas form's backward is the chunked form's VJP, so its gradients are those too."""
  seg = packed(1, [(1, 30), (2, 30), (0, 10)])
  args = inputs(1, seg.shape[1], 1, 2, 16, 8)
  ks = jax.random.split(jax.random.key(1), 2)
  ct = (jax.random.normal(ks[0], args[2].shape), jax.random.normal(ks[1], args[5].shape))

  def grads(fn):
    def f(q, k, v, g, beta, s0):
      return fn(q, k, v, g, beta, initial_state=s0, segment_ids_BT=seg)
    return jax.jit(lambda *a: jax.vjp(f, *a)[1](ct))(*args)

  want = grads(gd.recurrent_gated_delta_rule)
  for name in ('chunk', 'pallas_tpu'):
    got = grads(FORMS[name])
    errs = [max_err(a, b) / float(jnp.max(jnp.abs(b))) for a, b in zip(got, want)]
    print(f'{name} gradients vs recurrent (relative, q k v g beta s0): '
          + ' '.join(f'{e:.1e}' for e in errs))
    assert max(errs) < TOL, errs


HW_SHAPES = dict(B=2, T=1024, G=2, H=4, K=128, V=128)


def hw_args():
  B, T, G, H, K, V = HW_SHAPES.values()
  S = jax.ShapeDtypeStruct
  return (S((B, T, G, K), jnp.bfloat16), S((B, T, G, K), jnp.bfloat16),
          S((B, T, H, V), jnp.bfloat16), S((B, T, H), jnp.float32), S((B, T, H), jnp.float32),
          S((B, H, K, V), jnp.float32), S((B, T), jnp.int32))


def hw_loss(lowering):
  def loss(q, k, v, g, beta, s0, seg):
    out, final = gd.gated_delta_pallas(q, k, v, g, beta, initial_state=s0, segment_ids_BT=seg,
                                       lowering=lowering, interpret=False)
    return out.astype(jnp.float32).sum() + final.sum()
  return jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5))


@pytest.mark.parametrize('platform,lowering', [('tpu', 'tpu'), ('cuda', 'gpu')])
def test_lowers_for_hardware(platform, lowering):
  """Forward kernel and the recomputing backward lower to Mosaic TPU / Triton (not run here)."""
  lowered = jax.jit(hw_loss(lowering)).trace(*hw_args()).lower(lowering_platforms=(platform,))
  assert 'lm_gated_delta_fwd' in lowered.as_text()


def test_compiles_for_tpu():
  """libtpu's Mosaic compiler accepts the forward kernel (layouts, matmul forms) for a v5p chip.
  Forward only: the backward is the jnp form, which compiles as any XLA program does."""
  pytest.importorskip('libtpu')
  from lm.bench import targets  # pylint: disable=import-outside-toplevel
  device = targets.parse('v5p-8').devices()[0]
  sharding = jax.sharding.SingleDeviceSharding(device)
  args = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding) for a in hw_args()]

  def forward(q, k, v, g, beta, s0, seg):
    return gd.gated_delta_pallas(q, k, v, g, beta, initial_state=s0, segment_ids_BT=seg,
                                 lowering='tpu', interpret=False)

  compiled = jax.jit(forward).trace(*args).lower().compile()
  assert 'tpu_custom_call' in compiled.as_text()


def test_compiles_for_h100():
  """Triton and ptxas accept the kernel for an H100 (through the CUDA plugin's compile-only
  devices). Small shapes: the compile takes about 11 s of CPU; the hardware shapes above lower."""
  from lm.bench import targets  # pylint: disable=import-outside-toplevel
  from lm.errors import UserError  # pylint: disable=import-outside-toplevel
  try:
    device = targets.parse('h100x1').devices()[0]
  except UserError as e:  # the CUDA plugin is not installed
    pytest.skip(str(e))
  sharding = jax.sharding.SingleDeviceSharding(device)
  shapes = [(1, 128, 1, 64), (1, 128, 1, 64), (1, 128, 1, 64), (1, 128, 1), (1, 128, 1)]
  args = [jax.ShapeDtypeStruct(s, jnp.bfloat16 if len(s) == 4 else jnp.float32,
                               sharding=sharding) for s in shapes]
  forward = functools.partial(gd.gated_delta_pallas, lowering='gpu', interpret=False)
  compiled = jax.jit(forward).trace(*args).lower().compile()
  assert compiled.memory_analysis() is not None


def test_dispatch_on_cpu():
  q, k, v, g, beta, state = inputs(1, 40, 1, 1, 16, 16)
  seg = packed(1, [(1, 30), (2, 10)])
  assert gd.choose_implementation(k, v) == 'xla'  # CPU: interpret mode is slow
  want = jax.jit(gd.chunk_gated_delta_rule)(q, k, v, g, beta, initial_state=state,
                                            segment_ids_BT=seg)
  got = jax.jit(gd.gated_delta)(q, k, v, g, beta, initial_state=state, segment_ids_BT=seg)
  np.testing.assert_array_equal(got[0], want[0])
  got = jax.jit(functools.partial(gd.gated_delta, implementation='pallas'))(
      q, k, v, g, beta, initial_state=state, segment_ids_BT=seg)
  assert max_err(got[0], want[0]) < TOL
  with pytest.raises(ValueError, match='implementation'):
    gd.gated_delta(q, k, v, g, beta, implementation='cudnn')


def test_document_resets():
  seg = jnp.asarray([[0, 0, 1, 1, 0, 2, 2, 0, 0, 2, 3]])
  want = [[0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1]]  # only where a real token follows another document
  np.testing.assert_array_equal(gd.document_resets(seg), np.asarray(want, bool))


def test_sharded_pallas_equals_jnp():
  """Inside a mesh (data 2 x tensor 2 of the 8 CPU devices), 'pallas' runs in a shard_map over
  batch and heads: outputs, final state and gradients as the unsharded jnp form's."""
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:4]).reshape(2, 1, 2),
                           ('data', 'fsdp', 'tensor'))
  seg = jnp.concatenate([packed(1, [(1, 30), (2, 10)]), packed(1, [(1, 40)])])
  q, k, v, g, beta, state = inputs(2, 40, 2, 4, 16, 16)

  def loss_and_grads(implementation):
    def loss(q, k, v, g, beta, s0):
      out, final = gd.gated_delta(q, k, v, g, beta, initial_state=s0, segment_ids_BT=seg,
                                  implementation=implementation)
      return jnp.sum(out * v) + jnp.sum(final ** 2), (out, final)
    return jax.jit(jax.grad(loss, argnums=range(6), has_aux=True))

  with jax.set_mesh(mesh):
    assert 'shard_map' in str(jax.make_jaxpr(loss_and_grads('pallas'))(q, k, v, g, beta, state))
    got = loss_and_grads('pallas')(q, k, v, g, beta, state)
  want = loss_and_grads('xla')(q, k, v, g, beta, state)
  errs = [max_err(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))]
  print(f'sharded pallas vs jnp (outputs, state, gradients): max {max(errs):.1e}')
  assert max(errs) < TOL, errs


def test_the_cpu_unit_lower_solve_equals_lapacks_with_gradients():
  """The CPU path's solve (forward substitution, its own VJP) computes what
  lax.linalg.triangular_solve does, values and gradients; LAPACK's batched trsm deadlocked
  XLA:CPU's thread pool on 2 cores (lm bench hybrid hung at 4,096 tokens)."""
  from jax import lax  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  system = jnp.asarray(rng.standard_normal((2, 3, 16, 16)), jnp.float32) * 0.3
  rhs = jnp.asarray(rng.standard_normal((2, 3, 16, 5)), jnp.float32)
  weights = jnp.asarray(rng.standard_normal((2, 3, 16, 5)), jnp.float32)
  lapack = lambda s, r: lax.linalg.triangular_solve(s, r, left_side=True, lower=True,
                                                    unit_diagonal=True)
  np.testing.assert_allclose(gd.unit_lower_solve(system, rhs), lapack(system, rhs),
                             atol=2e-6)
  grads = lambda solve: jax.grad(lambda s, r: jnp.sum(solve(s, r) * weights), (0, 1))(system, rhs)
  (ds, dr), (ds_ref, dr_ref) = grads(gd.unit_lower_solve), grads(lapack)
  np.testing.assert_allclose(dr, dr_ref, atol=2e-6)
  np.testing.assert_allclose(jnp.tril(ds, -1), jnp.tril(ds_ref, -1), atol=5e-6)
  assert not np.any(np.triu(np.asarray(ds)))  # the solve reads only the strictly lower part
