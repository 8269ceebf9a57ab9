"""DPO as an objective of the one step, on pairs from the shared DPO demo data."""

import json
import os

import jax
import numpy as np
import pytest
from conftest import SHARED_DATA, tiny_config

from lm.train import objectives, partition
from lm.data.tokenizer import Tokenizer
from lm.train.state import ModelSpec
from lm.train.loop import Trainer

T = 64
DEMO = os.path.join(SHARED_DATA, 'llamafactory-dpo-demo', 'dpo_en_demo.json')
TOKENIZER = os.path.join(SHARED_DATA, 'llama2-tokenizer', 'tokenizer.model')


def demo_pairs(n, prompt_tokens=20, reply_tokens=10):
  """(prompt ids, chosen ids, rejected ids) of the first n demo records, cut to fit."""
  if not (os.path.isfile(DEMO) and os.path.isfile(TOKENIZER)):
    pytest.skip('shared data not present')
  with open(DEMO, encoding='utf-8') as f:
    records = json.load(f)[:n]
  tok = Tokenizer(TOKENIZER)
  out = []
  for r in records:
    prompt = '\n'.join(f'{m["from"]}: {m["value"]}' for m in r['conversations']) + '\ngpt: '
    p = [tok.bos_id] + tok.encode(prompt)[-prompt_tokens:]
    out.append((p, tok.encode(r['chosen']['value'])[:reply_tokens] + [tok.eos_id],
                tok.encode(r['rejected']['value'])[:reply_tokens] + [tok.eos_id]))
  return out


def preference_rows(pairs, per_row):
  """chosen_* / rejected_* rows; pair j of a row is segment j + 1 in both, at the same offset,
  with weight on the reply's tokens only (the layout lm/data's pair packing produces)."""
  rows = [pairs[i:i + per_row] for i in range(0, len(pairs), per_row)]
  batch = {f'{side}_{k}': np.zeros((len(rows), T), np.float32 if k == 'weights' else np.int32)
           for side in ('chosen', 'rejected')
           for k in ('tokens', 'targets', 'weights', 'segment_ids', 'positions')}
  for i, row in enumerate(rows):
    offset = 0
    for j, (prompt, chosen, rejected) in enumerate(row, 1):
      width = len(prompt) + max(len(chosen), len(rejected)) - 1
      for side, reply in (('chosen', chosen), ('rejected', rejected)):
        ids = np.asarray(prompt + reply)
        n = len(ids) - 1
        sl = slice(offset, offset + n)
        batch[f'{side}_tokens'][i, sl], batch[f'{side}_targets'][i, sl] = ids[:-1], ids[1:]
        batch[f'{side}_weights'][i, offset + len(prompt) - 1:offset + n] = 1.0
        batch[f'{side}_segment_ids'][i, sl] = j
        batch[f'{side}_positions'][i, sl] = np.arange(n)
      offset += width
    assert offset <= T
  return batch


def dpo_config(**lora):
  c = tiny_config(vocab_size=32000)
  c.data.update(seq_len=T, batch_size=4)
  c.train.objective = 'dpo'
  c.optimizer.update(lr=3e-3)
  if lora:
    c.model.lora.update(lora)
    c.train.trainable = 'lora'
  return c


def train(c, batch, steps):
  trainer = Trainer(c, devices=jax.devices()[:1])
  state = trainer.init_state()
  before = jax.device_get(state.params)
  batch = trainer.global_batch(batch)
  history = []
  for _ in range(steps):
    state, metrics = trainer.step(state, batch)
    history.append({k: float(v) for k, v in metrics.items()})
  return trainer, before, state, history


def test_lora_dpo_reference_is_the_base_with_adapters_off():
  c = dpo_config(rank=8, alpha=16.0)
  trainer, _, _, history = train(c, preference_rows(demo_pairs(8), per_row=2), steps=8)
  assert not any(n.startswith('ref.') for n in trainer.spec.names)  # no second copy
  first, last = history[0], history[-1]
  assert first['loss'] == pytest.approx(np.log(2), abs=1e-6)  # policy == reference at B = 0
  assert first['reward_margin'] == 0.0 and first['reward_accuracy'] == 0.0
  assert last['loss'] < first['loss'] - 0.05 and last['reward_accuracy'] >= 0.75
  assert last['reward_margin'] > 0 and last['chosen_reward'] > last['rejected_reward']
  assert first['tokens'] == 8  # the step's weight is the number of pairs


def test_full_dpo_carries_a_frozen_reference_copy():
  c = dpo_config()
  trainer, before, state, history = train(c, preference_rows(demo_pairs(4), per_row=1), steps=4)
  refs = [n for n in trainer.spec.names if n.startswith('ref.')]
  assert refs and all(trainer.labels[n] == partition.FROZEN for n in refs)
  after = jax.device_get(state.params)
  assert all(np.array_equal(before[n], after[n]) for n in refs)
  assert not np.array_equal(before['embed'], after['embed'])
  moments = {getattr(p[-1], 'key', None) for p, _ in jax.tree_util.tree_leaves_with_path(state.opt_state)}
  assert not moments & set(refs)
  assert history[0]['loss'] == pytest.approx(np.log(2), abs=1e-6)
  assert history[-1]['loss'] < history[0]['loss']
  assert trainer.trainable_summary().startswith(f'{trainer.spec.param_count():,} of')


def test_packed_pairs_give_the_same_loss_and_beta_scales_rewards():
  c = dpo_config(rank=4)
  spec = ModelSpec(c.model)
  params = spec.init(jax.random.key(0))
  params = {k: (v + 0.05 if k.endswith('lora_b') else v) for k, v in params.items()}
  pairs = demo_pairs(4)
  packed, single = preference_rows(pairs, per_row=2), preference_rows(pairs, per_row=1)
  assert packed['chosen_tokens'].shape[0] == 2 and single['chosen_tokens'].shape[0] == 4

  @jax.jit
  def run(batch):
    return [objectives.dpo(spec.bind(params), batch, beta=b) for b in (0.1, 0.5)]

  (loss_p, n_p, m_p), _ = run(packed)
  (loss_s, n_s, m_s), (_, _, m_s5) = run(single)
  assert float(n_p) == float(n_s) == 4
  np.testing.assert_allclose(loss_p, loss_s, rtol=1e-5)
  np.testing.assert_allclose(m_p['reward_margin'], m_s['reward_margin'], rtol=1e-4, atol=1e-6)
  assert abs(float(m_s['reward_margin'])) > 1e-4
  np.testing.assert_allclose(m_s5['reward_margin'], 5 * m_s['reward_margin'], rtol=1e-4)


@pytest.mark.parametrize('trainable', ['all'])  # 'norms' behaves alike; one case keeps CI short
def test_lora_dpo_that_also_trains_base_weights_gets_a_frozen_reference(trainable):
  """With adapters and base weights training, 'adapters off' would be the moving weights
  themselves (KL near 0 while the policy moves): the reference is a frozen `ref.*` copy."""
  c = dpo_config(rank=4, alpha=8.0)
  c.train.trainable = trainable
  trainer, before, state, history = train(c, preference_rows(demo_pairs(4), per_row=1), steps=3)
  refs = [n for n in trainer.spec.names if n.startswith('ref.')]
  assert refs and not any(n.endswith(('lora_a', 'lora_b')) for n in refs)
  after = jax.device_get(state.params)
  assert all(np.array_equal(before[n], after[n]) for n in refs)  # the reference stays put
  moved = 'embed' if trainable == 'all' else 'final_norm.scale'
  assert not np.array_equal(before[moved], after[moved])  # while the base weights train
  assert history[0]['loss'] == pytest.approx(np.log(2), abs=1e-6)
  assert history[-1]['reward_margin'] != 0.0  # rewards measured against the fixed copy
  assert not partition.trains_base(trainer.spec.names, 'lora')
