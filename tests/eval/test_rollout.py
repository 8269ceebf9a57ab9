"""The rollout engine (lm/eval/rollout.py): greedy output equal to the batch generator's with slots
refilled, per-request stops, sampled log-probs equal to the trainer's forward for every cache kind
(attention k/v, MLA latents, gated-DeltaNet state; with MoE), and a bounded number of compiled
programs."""

import jax
import numpy as np
import pytest
from conftest import tiny_config

from lm.eval import generate as gen
from lm.eval import rollout
from lm.train.grpo_loop import completion_rows
from lm.train.objectives import token_log_probs
from lm.train.state import ModelSpec

PROMPTS = [[5, 9, 14, 3, 7, 30, 2], [11, 4], [8, 8, 21, 40, 17], [3], list(range(40, 60))]
N = 6

KINDS = {  # token mixers and channel mixers as the families combine them
    'attention': {},  # Llama, Qwen, Gemma, ...
    'moe_mla': dict(moe=dict(n_experts=4, experts_per_token=2, expert_dim=16),  # DeepSeek-V3
                    mla=dict(kv_lora_rank=16, q_lora_rank=12, qk_nope_head_dim=8,
                             qk_rope_head_dim=4, v_head_dim=6)),
    'hybrid': dict(layer_types=('linear', 'full'),  # Qwen3.5 / Qwen3-Next: gated DeltaNet + attention
                   linear_attn=dict(n_key_heads=2, n_value_heads=4, key_head_dim=8,
                                    value_head_dim=8, conv_kernel=4)),
}


def _model(kind):
  fields = dict(KINDS[kind])
  nested = {k: fields.pop(k) for k in ('moe', 'mla') if k in fields}
  c = tiny_config(**fields)
  for k, v in nested.items():
    c.model[k].update(v)
  spec = ModelSpec(c.model)
  return c, spec, jax.jit(spec.init)(jax.random.key(0))


@pytest.fixture(scope='module')
def attention_model():
  """(config, spec, params, a greedy engine of 4 slots), its programs shared by the tests."""
  c, spec, params = _model('attention')
  return c, spec, params, rollout.RolloutEngine(spec, gen.Sampling(max_new_tokens=N), eos_id=None,
                                                slots=4)


def test_greedy_equals_the_batch_generator_with_slots_refilled(attention_model):
  """Four slots for five prompts (the last starts in a refilled slot beside samples midway):
  the same tokens as the batch generator's one left-padded batch. Then per-request stops."""
  c, spec, params, engine = attention_model
  P = 32
  tokens = np.zeros((len(PROMPTS), P), np.int32)
  for r, p in enumerate(PROMPTS):
    tokens[r, P - len(p):] = p
  lengths = np.array([len(p) for p in PROMPTS], np.int32)
  fn = jax.jit(gen.make_generate_fn(spec, gen.Sampling(max_new_tokens=N), eos_id=-1, pad_id=0))
  expected, _ = jax.device_get(fn(params, tokens, lengths, jax.random.key(0)))
  got = engine.run(params, [rollout.Request(tuple(p)) for p in PROMPTS], jax.random.key(0))
  assert [r[0].ids for r in got] == expected.tolist()
  assert all(r[0].stop is None for r in got)
  # Request 0 stops at its own two-token sequence, request 2 at a token of its output that
  # request 0 does not contain, request 1 at a token (as an eos would) both others lack.
  stop0 = tuple(expected[0, 2:4].tolist())
  stop2 = (int(next(t for t in expected[2] if t not in expected[0])),)
  stop1 = (int(next(t for t in expected[1] if t not in expected[0] and t not in expected[2])),)
  got = engine.run(params, [rollout.Request(tuple(PROMPTS[0]), stop=(stop0,)),
                            rollout.Request(tuple(PROMPTS[1]), stop=(stop1,)),
                            rollout.Request(tuple(PROMPTS[2]), stop=(stop2,))], jax.random.key(0))
  assert got[0][0].ids == expected[0, :2].tolist() and got[0][0].stop == stop0
  end1 = expected[1].tolist().index(stop1[0])
  assert got[1][0].ids == expected[1, :end1].tolist() and got[1][0].stop == stop1
  end2 = expected[2].tolist().index(stop2[0])
  assert got[2][0].ids == expected[2, :end2].tolist() and got[2][0].stop == stop2
  assert [len(r[0].logps) for r in got] == [4, end1 + 1, end2 + 1]  # the stop tokens' too


@pytest.mark.parametrize('kind', list(KINDS))
def test_sampled_log_probs_equal_the_trainers_forward(kind, attention_model):
  """G = 3 samples per prompt at temperature 1, each prompt prefilled once: each token's
  recorded log-prob equals token_log_probs (the trainer's forward, lm/train/objectives.py) of
  the GRPO row built from the sample, on the same weights. Attention runs 4 slots (refilled),
  the other kinds 9 (one fill)."""
  if kind == 'attention':
    c, spec, params, _ = attention_model
  else:
    c, spec, params = _model(kind)
  G = 3
  sampling = gen.Sampling(max_new_tokens=N, temperature=1.0)
  engine = rollout.RolloutEngine(spec, sampling, eos_id=None, slots=4 if kind == 'attention' else 9)
  prompts = PROMPTS[:3]
  got = engine.run(params, [rollout.Request(tuple(p), n=G) for p in prompts], jax.random.key(3))
  flat = [s for r in got for s in r]
  assert all(len(s.ids) == N for s in flat)
  assert all(len({tuple(s.ids) for s in r}) > 1 for r in got)  # one prefill, G different samples
  rows = completion_rows([p for p in prompts for _ in range(G)], [s.ids for s in flat],
                         [None] * len(flat), 0, 16)
  trainer_logp = np.asarray(jax.jit(lambda p, b: token_log_probs(spec.bind(p), b))(params, rows))
  for b, s in enumerate(flat):
    at = np.flatnonzero(rows['weights'][b])
    np.testing.assert_allclose(s.logps, trainer_logp[b, at], atol=2e-5)


def test_a_run_compiles_a_bounded_number_of_programs(attention_model):
  """Prompts of many lengths in two length buckets, more requests than slots: at most one
  decoding program and a prefill and an insert per (prompt count, length) bucket; a second run
  of other prompts in the same buckets compiles nothing."""
  c, spec, params, engine = attention_model
  rng = np.random.default_rng(0)
  prompts = [tuple(rng.integers(3, 100, n).tolist()) for n in (2, 5, 9, 17, 12, 20, 3, 8, 11)]
  before = engine.programs()
  engine.run(params, [rollout.Request(p) for p in prompts], jax.random.key(0))
  compiled = engine.programs()
  # cache init + decode + prefill and insert for Q in {1, 2, 4, 8} and P in {16, 32}
  assert compiled - before <= 2 + 2 * 4 * 2 and compiled <= 2 + 2 * 4 * 2
  engine.run(params, [rollout.Request(p[::-1]) for p in prompts], jax.random.key(1))
  assert engine.programs() == compiled
