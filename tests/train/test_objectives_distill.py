"""Logit distillation: the divergences and the mixed loss against a plain reference (loss and
gradient), and a teacher of another size carried frozen in the state under `teacher.*`."""

import jax
import numpy as np
import pytest
from conftest import random_batch, tiny_config

from lm.model import spec as spec_lib
from lm.errors import ConfigError
from lm.io import hf
from lm.train import objectives, partition
from lm.train.loop import Trainer
from lm.train.state import ModelSpec

B, T, V = 2, 5, 7


def log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def numpy_divergence(student, teacher, loss, temperature, beta):
  """The textbook formulas, in float64 numpy, token by token."""
  s, t = log_softmax(student / temperature), log_softmax(teacher / temperature)
  ps, pt = np.exp(s), np.exp(t)
  if loss == 'forward_kl':
    out = (pt * (t - s)).sum(-1)
  elif loss == 'reverse_kl':
    out = (ps * (s - t)).sum(-1)
  else:
    m = beta * pt + (1 - beta) * ps
    out = beta * (pt * (t - np.log(m))).sum(-1) + (1 - beta) * (ps * (s - np.log(m))).sum(-1)
  return out * temperature ** 2


def fixed(seed=0):
  rng = np.random.default_rng(seed)
  student = rng.normal(size=(B, T, V)) * 2
  teacher = rng.normal(size=(B, T, V)) * 2
  targets = rng.integers(0, V, (B, T))
  weights = (rng.random((B, T)) > 0.3).astype(np.float32)
  return student, teacher, targets, weights


@pytest.mark.parametrize('loss', objectives.DISTILL_LOSSES)
@pytest.mark.parametrize('temperature', [1.0, 2.0])
def test_divergences_match_numpy_and_their_gradient_matches_finite_differences(loss, temperature):
  student, teacher, _, _ = fixed()
  ours = objectives.distillation_divergence(student.astype(np.float32), teacher.astype(np.float32),
                                            loss=loss, temperature=temperature, jsd_beta=0.3)
  np.testing.assert_allclose(ours, numpy_divergence(student, teacher, loss, temperature, 0.3),
                             rtol=1e-4, atol=1e-6)
  grad = jax.grad(lambda x: objectives.distillation_divergence(
      x, teacher, loss=loss, temperature=temperature, jsd_beta=0.3).sum())(student)
  eps, rng = 1e-5, np.random.default_rng(1)
  for _ in range(4):  # central differences of the float64 reference at random coordinates
    i = tuple(rng.integers(0, n) for n in student.shape)
    up, down = student.copy(), student.copy()
    up[i] += eps
    down[i] -= eps
    numeric = (numpy_divergence(up, teacher, loss, temperature, 0.3).sum()
               - numpy_divergence(down, teacher, loss, temperature, 0.3).sum()) / (2 * eps)
    assert grad[i] == pytest.approx(numeric, rel=1e-3, abs=1e-5)


class LogitsModel:
  def __init__(self, logits, teacher=None):
    self.logits, self.teacher = logits, teacher

  def __call__(self, tokens, positions, segment_ids):
    del tokens, positions, segment_ids
    return self.logits


def test_distill_objective_mixes_sft_and_divergence_like_the_reference():
  student, teacher, targets, weights = fixed(2)
  student, teacher = student.astype(np.float32), teacher.astype(np.float32)
  batch = {'tokens': targets, 'positions': targets, 'segment_ids': targets, 'targets': targets,
           'weights': weights}

  def ours(x):
    loss, n, aux = objectives.distill(LogitsModel(x, LogitsModel(teacher)), batch, loss='jsd',
                                      temperature=2.0, weight=0.25, jsd_beta=0.5)
    return loss, (n, aux)

  def reference(x):
    logp = jax.nn.log_softmax(x, -1)
    xent = -jax.numpy.take_along_axis(logp, targets[..., None], -1)[..., 0]
    s, t = jax.nn.log_softmax(x / 2, -1), jax.nn.log_softmax(teacher / 2, -1)
    m = jax.numpy.log(0.5 * jax.numpy.exp(t) + 0.5 * jax.numpy.exp(s))
    jsd = 0.5 * (jax.numpy.exp(t) * (t - m)).sum(-1) + 0.5 * (jax.numpy.exp(s) * (s - m)).sum(-1)
    return ((0.75 * xent + 0.25 * 4 * jsd) * weights).sum()

  (loss, (n, aux)), grad = jax.value_and_grad(ours, has_aux=True)(student)
  want, want_grad = jax.value_and_grad(reference)(student)
  assert float(n) == weights.sum()
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-6)
  assert float(aux['divergence']) > 0


def distill_config(teacher_dir, **distill):
  c = tiny_config()
  c.data.update(batch_size=4, seq_len=8)
  c.train.objective = 'distill'
  c.distill.update(teacher=str(teacher_dir), **distill)
  return c


def saved_teacher(tmp_path, **model):
  """A random model of another size saved as a Hugging Face directory: (path, its weights)."""
  c = tiny_config(**model)
  spec = ModelSpec(c.model)
  params = jax.device_get(spec.init(jax.random.key(7)))
  hf.save(str(tmp_path), params, c.model)
  return tmp_path, params


def test_a_larger_teacher_rides_frozen_in_the_state_and_the_student_learns(tmp_path):
  teacher_dir, teacher = saved_teacher(tmp_path, d_model=48, n_layers=3, mlp_dim=96)
  c = distill_config(teacher_dir, loss='forward_kl', weight=1.0, temperature=1.0)
  trainer = Trainer(c, devices=jax.devices()[:1])
  names = [n for n in trainer.spec.names if n.startswith(spec_lib.TEACHER_PREFIX)]
  assert names and all(trainer.labels[n] == partition.FROZEN for n in names)
  assert trainer.spec.shapes['teacher.layers.attn.q.kernel'].shape[0] == 3  # its own shape
  assert trainer.spec.param_count() == ModelSpec(c.model).param_count()  # the teacher is not counted
  state = trainer.init_state()
  for n, v in teacher.items():
    np.testing.assert_allclose(state.params['teacher.' + n], v, rtol=1e-6)
  batch = trainer.global_batch(random_batch(c))
  history = []
  for _ in range(4):
    state, metrics = trainer.step(state, batch)
    history.append({k: float(v) for k, v in metrics.items()})
  for n, v in teacher.items():  # bit-identical after training
    np.testing.assert_array_equal(jax.device_get(state.params['teacher.' + n]), v)
  assert history[-1]['divergence'] < 0.5 * history[0]['divergence']


def test_a_teacher_with_another_vocabulary_is_refused(tmp_path):
  teacher_dir, _ = saved_teacher(tmp_path, vocab_size=256, d_model=16, n_layers=1, n_heads=2,
                                 n_kv_heads=1, mlp_dim=16)
  with pytest.raises(ConfigError, match='vocabulary of 256 tokens but the student has 128'):
    Trainer(distill_config(teacher_dir), devices=jax.devices()[:1])
  with pytest.raises(ConfigError, match='distill.loss'):
    objectives.from_config(distill_config(teacher_dir, loss='kl'))
  with pytest.raises(ConfigError, match='needs a teacher'):
    Trainer(distill_config(''), devices=jax.devices()[:1])
