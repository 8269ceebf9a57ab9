"""GSPO (sequence-level importance ratio) against TRL's GRPOTrainer loss on the same inputs, and
on-policy distillation (the teacher's per-token reverse KL as a negative advantage) against a
plain reference."""

import types
from collections import defaultdict

import jax
import numpy as np
import pytest
from test_objectives_grpo import LogitsModel, fixed, B, T, W

from lm.errors import ConfigError
from lm.train import objectives


def trl_loss(policy, batch, ref_logps, *, lo, hi, beta, loss_type, level):
  """TRL's GRPOTrainer._compute_loss on lm's rows (completion mask = lm's weights), its model
  forward replaced by the log-probs of `policy`'s logits; returns (loss, d loss / d logits)."""
  torch = pytest.importorskip('torch')
  grpo_trainer = pytest.importorskip('trl.trainer.grpo_trainer')
  logits = torch.tensor(policy, dtype=torch.float64, requires_grad=True)
  targets = torch.tensor(batch['targets'], dtype=torch.int64)
  logps = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
  same = lambda x, **_: x
  stub = types.SimpleNamespace(
      _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
      top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level,
      beta=beta, args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None),
      loss_type=loss_type, epsilon_low=lo, epsilon_high=hi, use_vllm=False,
      model=types.SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
      _entropy_bonus_enabled=False, aux_loss_enabled=False, max_completion_length=8,
      _metrics={'train': defaultdict(list)},
      accelerator=types.SimpleNamespace(gather=same, reduce=same, gather_for_metrics=same))
  f64 = lambda x: torch.tensor(np.asarray(x), dtype=torch.float64)
  inputs = {'prompt_ids': torch.zeros((B, 0), dtype=torch.int64),
            'prompt_mask': torch.zeros((B, 0), dtype=torch.int64),
            'completion_ids': targets, 'completion_mask': f64(W),
            'advantages': f64(batch['advantages']), 'old_per_token_logps': f64(batch['old_logps']),
            'ref_per_token_logps': f64(ref_logps)}
  loss = grpo_trainer.GRPOTrainer._compute_loss(stub, None, inputs)
  loss.backward()
  return float(loss), logits.grad.numpy()


@pytest.mark.parametrize('loss_type,level,lo,hi,beta', [
    ('grpo', 'sequence', 3e-4, 4e-4, 0.0),  # GSPO as its paper and TRL's docs set it
    ('grpo', 'sequence', 0.05, 0.1, 0.04),
    ('dr_grpo', 'sequence', 0.1, 0.1, 0.0),
    ('grpo', 'token', 0.2, 0.28, 0.04),  # the token level, GRPO itself, for contrast
])
def test_gspo_matches_trl_loss_and_gradient(loss_type, level, lo, hi, beta):
  batch, policy, ref = fixed()
  ref_logps = np.take_along_axis(np.asarray(jax.nn.log_softmax(ref, -1)),
                                 batch['targets'][..., None], -1)[..., 0]

  batch = {k: (v.astype(np.float64) if v.dtype == np.float32 else v) for k, v in batch.items()}

  def ours(p):
    loss, n, _ = objectives.grpo(LogitsModel(p, LogitsModel(ref.astype(np.float64))), batch,
                                 clip_low=lo, clip_high=hi, kl_coef=beta, loss_type=loss_type,
                                 max_completion=8, importance_level=level)
    return loss / n

  with jax.enable_x64(True):  # both sides in float64: the comparison sees the formula, not rounding
    loss, grad = jax.value_and_grad(ours)(policy.astype(np.float64))
  want, want_grad = trl_loss(policy, batch, ref_logps, lo=lo, hi=hi, beta=beta,
                             loss_type=loss_type, level=level)
  assert float(loss) == pytest.approx(want, rel=1e-6, abs=1e-9)
  np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-6, atol=1e-9)
  assert np.abs(want_grad).max() > 1e-4  # some ratio is inside the clip range: a gradient flows


def test_gspo_gives_every_token_of_a_completion_its_sequence_ratio():
  batch, policy, _ = fixed()
  _, _, aux = objectives.grpo(LogitsModel(policy), batch, clip_low=0.2, clip_high=0.2,
                              kl_coef=0.0, importance_level='sequence')
  logp = np.take_along_axis(np.asarray(jax.nn.log_softmax(policy, -1)),
                            batch['targets'][..., None], -1)[..., 0]
  seq = np.exp(((logp - batch['old_logps']) * W).sum(1) / W.sum(1))  # geometric mean per row
  # The step divides metric sums by the weight (rows, loss_type grpo): the token mean of the ratio.
  assert float(aux['ratio']) / B == pytest.approx((seq[:, None] * W).sum() / W.sum(), rel=1e-5)
  with pytest.raises(ConfigError, match="grpo.importance_level='word'"):
    objectives.grpo(LogitsModel(policy), batch, kl_coef=0.0, importance_level='word')


class Student(LogitsModel):
  def __init__(self, logits, teacher):
    super().__init__(logits)
    self.teacher = teacher


def test_on_policy_distillation_takes_the_reverse_kl_of_each_sampled_token_as_negative_advantage():
  batch, policy, teacher = fixed()
  coef = 0.5
  lp = lambda x: np.take_along_axis(np.asarray(jax.nn.log_softmax(x, -1)),
                                    batch['targets'][..., None], -1)[..., 0]
  batch['old_logps'] = lp(policy)  # on-policy: sampled by the policy being trained (ratio 1)

  def ours(p):
    loss, n, aux = objectives.grpo(Student(p, LogitsModel(teacher)), batch, kl_coef=0.0,
                                   teacher_coef=coef)
    return loss / n, aux

  def reference(p):
    """Per token: advantage A - coef (log pi_old - log teacher), in GRPO's clipped surrogate."""
    logp = jax.nn.log_softmax(p, -1)
    taken = jax.numpy.take_along_axis(logp, batch['targets'][..., None], -1)[..., 0]
    adv = batch['advantages'][:, None] - coef * (batch['old_logps'] - lp(teacher))
    ratio = jax.numpy.exp(taken - batch['old_logps'])
    per_token = -jax.numpy.minimum(ratio * adv, jax.numpy.clip(ratio, 0.8, 1.2) * adv)
    return jax.numpy.mean((per_token * W).sum(1) / W.sum(1))

  (loss, aux), grad = jax.value_and_grad(ours, has_aux=True)(policy)
  want, want_grad = jax.value_and_grad(reference)(policy)
  np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-7)
  kl = (batch['old_logps'] - lp(teacher))
  assert float(aux['teacher_kl']) / B == pytest.approx((kl * W).sum() / W.sum(), rel=1e-5)
  # A teacher that is the student itself adds nothing: plain GRPO's loss and gradient.
  same = lambda p: objectives.grpo(Student(p, LogitsModel(policy)), batch, kl_coef=0.0,
                                   teacher_coef=coef)[0]
  plain = lambda p: objectives.grpo(LogitsModel(p), batch, kl_coef=0.0)[0]
  np.testing.assert_allclose(jax.grad(same)(policy), jax.grad(plain)(policy), atol=1e-6)
  with pytest.raises(ConfigError, match='needs a teacher'):
    objectives.grpo(Student(policy, None), batch, kl_coef=0.0, teacher_coef=coef)


def test_on_policy_distillation_through_the_train_step_moves_the_student_to_the_teacher(tmp_path):
  """The state carries the teacher frozen (`teacher.*`) for grpo with grpo.teacher_coef > 0;
  steps whose only advantage is the teacher's bring the student's log-probs of the tokens it
  is trained on toward the teacher's."""
  from conftest import random_batch, tiny_config
  from test_objectives_distill import saved_teacher
  from lm.train.loop import Trainer
  teacher_dir, _ = saved_teacher(tmp_path, d_model=48, n_layers=1, mlp_dim=96)
  c = tiny_config(n_layers=1)
  c.train.objective = 'grpo'
  c.distill.teacher = str(teacher_dir)
  c.grpo.update(teacher_coef=1.0, kl_coef=0.0)
  trainer = Trainer(c, devices=jax.devices()[:1])
  assert any(n.startswith('teacher.') for n in trainer.spec.names)
  state = trainer.init_state()
  both = jax.jit(lambda params, batch: (
      objectives.token_log_probs(trainer.spec.bind(params), batch),
      objectives.token_log_probs(objectives.Policy(trainer.spec.bind(params).teacher), batch)))
  batch = random_batch(c)
  batch['advantages'] = np.zeros(c.data.batch_size, np.float32)
  w = batch['weights'] > 0
  gaps = []
  for _ in range(6):
    student, teacher = map(np.asarray, both(state.params, batch))
    gaps.append(np.abs(student - teacher)[w].mean())
    state, metrics = trainer.step(state, {**batch, 'old_logps': student})  # on-policy
    assert float(metrics['teacher_kl']) == pytest.approx((student - teacher)[w].mean(), rel=1e-3)
  assert gaps[-1] < 0.5 * gaps[0], gaps
