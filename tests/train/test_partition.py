"""Partitions are config values: the same labels choose gradients and optimizer state."""

import jax
import numpy as np
import pytest
from conftest import tiny_config, train_steps

from lm.train import partition
from lm.errors import ConfigError
from lm.train.state import ModelSpec


def trainable(spec, value):
  return {n for n, l in partition.labels(spec.names, value).items() if l == partition.TRAINABLE}


def test_named_partitions_select_by_name():
  c = tiny_config(qkv_bias=True)
  c.model.lora.update(rank=2, targets=r'attn\.q')
  spec = ModelSpec(c.model, reference=True)
  base = {n for n in spec.names if not n.startswith('ref.')}
  assert trainable(spec, 'all') == base  # the reference copy never trains
  assert trainable(spec, 'lora') == {'layers.attn.q.lora_a', 'layers.attn.q.lora_b'}
  assert trainable(spec, 'bitfit') == {'layers.attn.q.bias', 'layers.attn.k.bias', 'layers.attn.v.bias'}
  assert trainable(spec, 'norms') == {'layers.attn_norm.scale', 'layers.mlp_norm.scale',
                                      'final_norm.scale'}
  assert trainable(spec, 'freeze_embeddings') == base - {'embed'}
  with pytest.raises(ConfigError, match='selects no parameters'):
    trainable(spec, r'regex:^ref\.')
  llama = ModelSpec(tiny_config().model)
  with pytest.raises(ConfigError, match='this model has no biases'):
    trainable(llama, 'bitfit')
  with pytest.raises(ConfigError, match='set model.lora.rank > 0'):
    trainable(llama, 'lora')
  with pytest.raises(ConfigError, match="'lroa' is not a known partition"):
    trainable(llama, 'lroa')
  with pytest.raises(ConfigError, match='freezes all 2 layers'):
    partition.layer_masks(llama.shapes, 'freeze_first_layers:2')


@pytest.mark.parametrize('value', ['freeze_first_layers:1', 'freeze_embeddings'])
def test_frozen_parts_stay_bit_identical(value):
  c = tiny_config()
  c.train.trainable = value
  c.optimizer.weight_decay = 0.5  # decoupled decay must not move frozen rows either
  trainer, state, before, after = train_steps(c, steps=2)
  if value == 'freeze_embeddings':
    assert np.array_equal(before['embed'], after['embed'])
    assert not np.array_equal(before['lm_head.kernel'], after['lm_head.kernel'])
    moments = {getattr(p[-1], 'key', None)
               for p, _ in jax.tree_util.tree_leaves_with_path(state.opt_state)}
    assert 'embed' not in moments
  else:
    for name in before:
      if name.startswith('layers.'):
        assert np.array_equal(before[name][0], after[name][0]), name
        assert not np.array_equal(before[name][1], after[name][1]), name
    assert not np.array_equal(before['embed'], after['embed'])
    per_layer = sum(v[0].size for n, v in before.items() if n.startswith('layers.'))
    total = sum(v.size for v in before.values())
    assert trainer.trainable_summary().startswith(f'{total - per_layer:,} of {total:,}')
