"""The training loop: build everything from the config, run the one step, log, evaluate, checkpoint.

`Trainer` holds the pieces (mesh, spec, optimizer, jitted step) so research code can drive single
steps; `train(cfg, workdir)` is the whole run behind `lm train`. Running it again on a workdir that
holds a checkpoint resumes from it, including the data position. What the run survives (kills,
preemption, corrupt checkpoints, numerical faults) is in docs/reliability.md.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from lm import config as config_lib
from lm import host_memory
from lm.model import ring_attention
from lm.model import stack as stack_lib
from lm.train import flops as flops_lib
from lm.train import (balancing, identity, objectives, offload, optim, partition, preemption, rundir,
                      step_flops)
from lm.io import pretrained
from lm import sharding as sharding_lib
from lm.train.checkpoint import Checkpointer
from lm.data import pipeline
from lm.eval import evaluate
from lm.errors import ConfigError, Diverged, Preempted
from lm.train import metrics as metrics_lib
from lm.train import trackers
from lm.train.metrics import MetricWriter
from lm.train.state import ModelSpec, stored_dtypes, train_state_factory
from lm.train.step import make_eval_step, make_train_step


class Trainer:
  """A model, its optimizer and its jitted step on a mesh, built from a config."""

  def __init__(self, cfg, *, objective=None, devices=None):
    pretrained.resolve_config(cfg)  # with train.init_from, the model's shape comes from there
    config_lib.ensure_valid(cfg)  # a no-op for a config lm.config.load_config already checked
    self.cfg = cfg
    self.mesh = sharding_lib.make_mesh(cfg.mesh, devices)
    rules = tuple(cfg.mesh.rules)
    sharding_lib.check_batch_divides(cfg.data.batch_size, cfg.train.microbatches, self.mesh, rules)
    sharding_lib.check_context_divides(cfg.data.seq_len, self.mesh)
    # model.context_parallel=ring: the step and evaluation reorder each sequence's chunks where
    # the batch is split over `context` (lm/model/ring_attention.py); None keeps the order.
    self.ring_context = None
    if (cfg.model.get('context_parallel') == 'ring'
        and sharding_lib.context_parallel_size(self.mesh) > 1):
      self.ring_context = sharding_lib.context_parallel_size(self.mesh)
      ring_attention.check_splits(cfg.data.seq_len, self.ring_context)
    # The reference of DPO, IPO, KTO and GRPO: with only LoRA adapters training, the same weights
    # with adapters off; when any base weight trains (no LoRA, or LoRA with train.trainable=all,
    # norms, ...), those would be the weights being trained, so a frozen `ref.*` copy.
    needs_reference = objectives.needs_reference(cfg)
    teacher = pretrained.teacher_model_config(cfg) if objectives.needs_teacher(cfg) else None
    self.spec = ModelSpec(cfg.model, reference=needs_reference and not cfg.model.lora.rank,
                          teacher=teacher)
    if needs_reference and cfg.model.lora.rank and partition.trains_base(self.spec.names,
                                                                         cfg.train.trainable):
      self.spec = ModelSpec(cfg.model, reference=True, teacher=teacher)
    self.labels = partition.labels(self.spec.names, cfg.train.trainable)
    check_quantized_frozen(self.spec, self.labels, cfg)
    self.row_masks = partition.layer_masks(
        self.spec.shapes, cfg.train.trainable,
        lambda name: stack_lib.layer_rows(self.spec.cfg, name))
    self.tx, self.schedule = optim.make_optimizer(cfg.optimizer, self.labels, cfg.train.steps,
                                                  self.row_masks)
    host_optimizer = cfg.train.offload == 'host'  # between steps: lm/train/offload.py
    if host_optimizer:
      offload.check_supported(list(self.mesh.devices.flat))
    self.init, self.abstract_state, self.shardings = train_state_factory(
        self.spec, self.tx, self.mesh, rules, guard_window=cfg.train.spike_window,
        dtypes=stored_dtypes(self.spec.shapes, self.labels, cfg.train.frozen_dtype),
        host_optimizer=host_optimizer)
    self.objective = objective or objectives.from_config(cfg)
    step_fn = make_train_step(self.spec, self.objective, self.tx, self.schedule, self.labels,
                              cfg.train.microbatches, seed=cfg.train.seed,
                              spike_zscore=cfg.train.spike_zscore,
                              state_update=balancing.from_config(self.spec.cfg))
    if host_optimizer:
      step_fn = offload.streamed(step_fn)
    self.batch_sharding = sharding_lib.batch_sharding(self.mesh, rules)
    # Traced with the logical-axis rules active (sharding.constrain inside the model and loss) and
    # run with the mesh set (attention dispatch follows the mesh's devices, sharding.target).
    traced_in = lambda fn: _traced_in(self.mesh, rules, fn, self.ring_context, self.batch_sharding)
    self.step = sharding_lib.InMesh(jax.jit(
        traced_in(step_fn), in_shardings=(self.shardings, self.batch_sharding),
        out_shardings=(self.shardings, None), donate_argnums=0), self.mesh)
    self.eval_step = sharding_lib.InMesh(
        jax.jit(traced_in(make_eval_step(self.spec, objectives.for_evaluation(self.objective))),
                in_shardings=(self.shardings.params, self.batch_sharding)), self.mesh)

  def init_state(self, seed: int | None = None):
    rng = jax.random.key(self.cfg.train.seed if seed is None else seed)
    if self.spec.teacher_cfg is not None:  # the frozen teacher's weights join the starting ones
      loaded = pretrained.teacher_params(self.cfg.distill.teacher, self.spec, self.shardings.params)
      if self.cfg.train.init_from:
        loaded.update(pretrained.load_params(self.cfg.train.init_from, self.spec,
                                             self.shardings.params))
      return self.init(rng, loaded)
    if self.cfg.train.init_from:
      return pretrained.init_state(self, rng)
    return self.init(rng)

  def global_batch(self, local_batch: dict) -> dict:
    """This process's rows -> one global array per key, sharded along the data axes."""
    B = self.cfg.data.batch_size
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v),
                                                      (B, *v.shape[1:]))
            for k, v in local_batch.items()}

  def trainable_summary(self) -> str:
    trainable, total = partition.trainable_count(self.spec.shapes, self.labels, self.row_masks)
    return (f'{trainable:,} of {total:,} parameters trainable ({100 * trainable / total:.2f}%, '
            f'train.trainable={self.cfg.train.trainable})')

  def evaluate(self, params, rows: dict, max_batches: int) -> dict:
    """Mean weighted loss and perplexity over up to `max_batches` batches of `rows`; for other
    objectives than next_token_xent also their metrics (reward accuracy, margin, ...) as eval_*."""
    loss_sum = weight_sum = 0.0
    metric_sums = {}
    for batch in eval_batches(rows, self.cfg.data.batch_size, max_batches,
                              jax.process_index(), jax.process_count()):
      out = jax.device_get(self.eval_step(params, self.global_batch(batch)))
      loss_sum += float(out['loss_sum'])
      weight_sum += float(out['weight_sum'])
      for k, v in out['metric_sums'].items():
        metric_sums[k] = metric_sums.get(k, 0.0) + float(v)
    loss = loss_sum / max(weight_sum, 1.0)
    metrics = {'eval_loss': loss, 'eval_perplexity': metrics_lib.perplexity(loss)}
    if self.cfg.train.objective != 'next_token_xent':
      metrics.update({f'eval_{k}': v / max(weight_sum, 1.0) for k, v in metric_sums.items()})
    return metrics


def check_quantized_frozen(spec, labels: dict, cfg) -> None:
  """QLoRA's quantized base weights cannot train: a partition that would train one is refused."""
  training = [n for n in spec.quantized if labels[n] == partition.TRAINABLE]
  if training:
    raise ConfigError(
        f'model.quant.type={cfg.model.quant.type} stores the base weights quantized and frozen, but '
        f'train.trainable={cfg.train.trainable} would train {training[0]} (and '
        f'{len(training) - 1} more); use train.trainable=lora (QLoRA) or model.quant.type=none')


def _traced_in(mesh, rules, fn, ring_context=None, batch_sharding=None):
  """`fn(..., batch)` traced with the mesh's logical-axis rules active (sharding.constrain inside
  the model). With `ring_context` (model.context_parallel=ring), every per-token array of the
  batch ([B, T, ...]) is put in ring order as it arrives split over `context`, and attention runs
  as ring attention: tokens, targets, weights, positions and segment ids move together, and the
  losses, sums over tokens and segments, do not depend on the order."""
  @functools.wraps(fn)  # keeps the jitted program's name (jit_step) in dumps and profiles
  def traced(*args):
    with sharding_lib.activation_sharding(mesh, rules):
      if ring_context is None:
        return fn(*args)
      *rest, batch = args
      reorder = lambda x: x if x.ndim < 2 else jax.lax.with_sharding_constraint(
          ring_attention.to_ring_order(x, ring_context), batch_sharding)
      with ring_attention.ring_layout():
        return fn(*rest, {k: reorder(v) for k, v in batch.items()})
  return traced


def eval_batches(rows: dict, global_batch: int, max_batches: int, process_index=0, process_count=1):
  """Fixed-order batches; the last is padded with zero-weight rows so no held-out row is lost.
  Preference rows (chosen_* / rejected_*) have their weights zeroed alike."""
  n = len(next(iter(rows.values())))
  n_batches = min(max_batches, -(-n // global_batch))
  local = global_batch // process_count
  for b in range(n_batches):
    idx = np.arange(b * global_batch + process_index * local, b * global_batch + (process_index + 1) * local)
    valid = idx < n
    idx = np.where(valid, idx, 0)
    batch = {k: v[idx] for k, v in rows.items()}
    for k in batch:
      if k.endswith('weights'):
        batch[k] = batch[k] * valid[:, None]
    yield batch


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    tqdm.write(msg)


def make_checkpointer(cfg, workdir: str, labels: dict) -> Checkpointer:
  """Saves the trainable parameters (all, unless some are frozen) with a record of where the
  frozen rest comes from, so a partial run resumes only on top of the same base."""
  meta = {'base': {'init_from': cfg.train.get('init_from'), 'seed': cfg.train.seed},
          'seeds': {'train': cfg.train.seed, 'data': cfg.data.seed}}
  return Checkpointer(workdir, keep=cfg.train.keep_checkpoints, keep_every=cfg.train.keep_every,
                      async_save=cfg.train.async_checkpoint, labels=labels, meta=meta)


def restore(trainer: Trainer, ckpt: Checkpointer):
  """(state, data_state) from the latest readable checkpoint; frozen parameters from the base."""
  base = trainer.init_state().params if any(
      v != partition.TRAINABLE and k not in partition.NOT_TRAINED
      for k, v in trainer.labels.items()) else None
  return ckpt.restore(trainer.abstract_state, trainer.shardings, base_params=base)


def _evaluation_hooks(cfg, trainer, tokenizer):
  """(task evaluator or None, early stopping or None) from `train.eval_tasks` / `early_stopping_*`."""
  if not (cfg.train.eval_tasks or cfg.train.early_stopping_metric):
    return None, None
  stopper = (evaluate.EarlyStopping(cfg.train.early_stopping_metric,
                                    cfg.train.early_stopping_patience,
                                    cfg.train.early_stopping_min_delta)
             if cfg.train.early_stopping_metric else None)
  return evaluate.training_evaluator(cfg, trainer.spec, tokenizer, trainer.mesh), stopper


def train(cfg, workdir: str, *, progress: bool = True) -> dict:
  """Runs (or resumes) the configured training; returns the final metrics.

  Bad input raises a UserError and leaves no output behind; a stop signal raises Preempted after
  writing a checkpoint; too many skipped steps raise Diverged.
  """
  pretrained.resolve_config(cfg)  # with train.init_from, the model's shape comes from there
  config_lib.ensure_valid(cfg)
  objectives.check_data(cfg)
  trackers.names(cfg)  # an unknown or uninstalled tracker, before any work
  if cfg.model.quant.type != 'none':  # before any data is read or anything compiles
    spec = ModelSpec(cfg.model)
    check_quantized_frozen(spec, partition.labels(spec.names, cfg.train.trainable), cfg)
  if cfg.train.objective == 'grpo':
    raise ConfigError('train.objective=grpo runs its own loop: use lm.train.runner.train '
                      '(what `lm train` and lm.run_training call)')
  if cfg.train.objective in objectives.NEEDS_TEACHER:
    pretrained.teacher_model_config(cfg)  # a missing or mismatched teacher fails before any work
  is_main = jax.process_index() == 0
  with rundir.removed_on_user_error(os.path.abspath(workdir), is_main=is_main):
    workdir = rundir.prepare(workdir)
    with rundir.single_writer(workdir, enabled=is_main):
      rundir.check_confined(workdir)
      return _train(cfg, workdir, progress=progress)


def _train(cfg, workdir: str, *, progress: bool = True) -> dict:
  is_main = jax.process_index() == 0
  trainer = Trainer(cfg)  # the mesh and partition checks, before any data is read

  if is_main:
    tokenizer = pipeline.load_tokenizer(cfg.data, workdir)
  multihost_utils.sync_global_devices('tokenizer')
  tokenizer = pipeline.load_tokenizer(cfg.data, workdir)
  pipeline.check_vocab(tokenizer, cfg.model.vocab_size)
  run_identity = identity.of(cfg, tokenizer)
  if rundir.has_checkpoints(workdir):  # resuming: the same run, or a stated change
    identity.check(workdir, run_identity, cfg.train.resume_changes)
  corpus = pipeline.build_corpus(cfg.data, tokenizer)

  train_iter = pipeline.BatchIterator(corpus.train, cfg.data.batch_size, cfg.data.seed,
                                      process_index=jax.process_index(),
                                      process_count=jax.process_count())
  ckpt = make_checkpointer(cfg, workdir, trainer.labels)
  if ckpt.latest_step() is not None:
    t0 = time.perf_counter()
    state, data_state = restore(trainer, ckpt)
    train_iter.set_state(data_state)
    _log(f'resumed from {ckpt.directory} at step {int(state.step)} '
         f'(restored in {time.perf_counter() - t0:.2f}s)')
  else:
    state = trainer.init_state()
  if is_main:  # after the restore, so a run that cannot resume keeps the record of its own config
    rundir.write_text(rundir.inside(workdir, 'config.json'), cfg.to_json_best_effort(indent=2))
    identity.record(workdir, run_identity)

  T, B = cfg.data.seq_len, cfg.data.batch_size
  # The FLOPs this mode's step needs (LoRA or frozen layers skip weight gradients), as `lm plan`.
  flops_per_token = step_flops.batch_token_flops(trainer)
  peak, peak_source = flops_lib.peak_flops_per_device(cfg.metrics.peak_flops_per_device)
  peak_total = peak * jax.device_count()
  unigram_ppl = pipeline.unigram_perplexity(corpus)
  _log(f'lm: {trainer.spec.param_count():,} parameters on mesh {dict(trainer.mesh.shape)}; '
       f'{trainer.trainable_summary()}')
  _log(f'{corpus.describe()}; vocab {tokenizer.vocab_size}; '
       f'unigram baseline perplexity {unigram_ppl:.2f}')
  _log(f'MFU against {peak / 1e12:.3g} TFLOP/s per device ({peak_source})')

  task_eval, stopper = _evaluation_hooks(cfg, trainer, tokenizer)
  writer = MetricWriter(workdir, cfg, enabled=is_main)
  start = int(state.step)
  total = cfg.train.steps
  bar = tqdm(total=total, initial=start, disable=not (progress and is_main), dynamic_ncols=True,
             desc='train')
  summary = {}
  # Throughput over the steps since the last log line (evaluation time excluded).
  pending, window_start, window_step = None, time.perf_counter(), start

  def report(step, metrics):
    nonlocal window_start, window_step
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if metrics['bad_streak'] >= cfg.train.max_bad_steps:
      writer.write(step, metrics)
      raise Diverged(diverged_message(cfg, step, metrics, ckpt))
    if step % cfg.train.log_every == 0 or step == total:
      now = time.perf_counter()
      tokens_per_s = (step - window_step) * B * T / max(now - window_start, 1e-9)
      metrics.update(tokens_per_s=tokens_per_s,
                     mfu=tokens_per_s * flops_per_token / peak_total)
      metrics.update(train_iter.metrics())  # per-source tokens, skipped/truncated records
      window_start, window_step = now, step
      writer.write(step, metrics)
      bar.set_postfix(loss=f'{metrics["loss"]:.3f}', tok_s=f'{tokens_per_s:,.0f}',
                      mfu=f'{metrics["mfu"]:.1%}', refresh=False)
    summary.update(metrics)

  stop = preemption.StopSignal(cfg.train.grace_seconds)
  fault = preemption.injected_fault()
  poison = preemption.injected_numbers()
  last_saved = start
  try:
    with stop:
      for step in range(start, total):
        batch = trainer.global_batch(poison(step + 1, next(train_iter)))
        state, metrics = trainer.step(state, batch)
        # Fetch the previous step's metrics only after the next step is dispatched.
        if pending is not None:
          report(*pending)
        # Loading and compiling are behind us after the first step, and the single-arena heap
        # fragments as steps go: its free pages go back then and at every log line. No sync
        # first: the step in flight keeps its temporaries, so the next one faults nothing in.
        if step == start or (step + 1) % cfg.train.log_every == 0:
          host_memory.release_free_pages()
        pending = (step + 1, metrics)
        bar.update(1)
        done = step + 1
        early_stop = False
        if done % cfg.train.eval_every == 0 or done == total:
          report(*pending)
          pending = None
          eval_metrics = trainer.evaluate(state.params, corpus.eval, cfg.train.eval_batches)
          if task_eval is not None:
            eval_metrics.update(task_eval(state.params))
          writer.write(done, eval_metrics)
          summary.update(eval_metrics)
          host_memory.release_free_pages()  # the evaluation's temporaries are not the step's
          _log(f'step {done}: loss {summary["loss"]:.4f}, '
               + held_out_line(cfg, eval_metrics, unigram_ppl)
               + ''.join(f', {k} {v:.4g}' for k, v in eval_metrics.items() if '/' in k))
          window_start, window_step = time.perf_counter(), done
          early_stop = stopper is not None and stopper.update(done, eval_metrics)
        if done % cfg.train.checkpoint_every == 0 or done == total or early_stop:
          ckpt.save(done, state, train_iter.get_state())
          last_saved = done
        if early_stop:
          _log(f'early stopping at step {done}: {cfg.train.early_stopping_metric} has not improved '
               f'since step {stopper.best_step}')
          summary['early_stopped_at'] = done
          break
        if stop.should_stop() and done < total:
          if pending is not None:
            report(*pending)
            pending = None
          if last_saved != done:
            ckpt.save(done, state, train_iter.get_state(), force=True)
          ckpt.wait()
          writer.flush()
          raise Preempted(f'{stop.name} at step {done}: checkpoint written to {ckpt.directory}; '
                          'run the same command to resume')
        fault(done)
      if pending is not None:
        report(*pending)
  except BaseException:
    writer.close(failed=True)
    raise
  finally:
    bar.close()
    train_iter.close()
    ckpt.close()  # waits for a checkpoint still being written: it must be whole before exit

  if start >= total:
    _log(f'already trained to step {start}; evaluating')
    previous = os.path.join(workdir, 'summary.json')
    if os.path.isfile(previous):  # keep what the training run recorded (its loss, early stopping)
      with open(previous, encoding='utf-8') as f:
        summary.update(json.load(f))
    summary.update(trainer.evaluate(state.params, corpus.eval, cfg.train.eval_batches))
  summary.update(unigram_perplexity=unigram_ppl, step=int(state.step))
  if stopper is not None:
    summary.update(stopper.summary())
  if is_main:
    rundir.write_text(rundir.inside(workdir, 'summary.json'), json.dumps(summary, indent=2))
  writer.close(summary)
  return summary


def held_out_line(cfg, metrics: dict, unigram_perplexity: float, *, final: bool = False) -> str:
  """The held-out figure a log line shows: perplexity beside the unigram baseline for language
  modelling; the objective's own loss otherwise (exp of a DPO loss is no perplexity)."""
  if cfg.train.objective == 'next_token_xent':
    baseline = (f' vs unigram baseline {unigram_perplexity:.2f}' if final else
                f' (unigram baseline {unigram_perplexity:.2f})')
    return f'held-out perplexity {metrics["eval_perplexity"]:.2f}{baseline}'
  if cfg.train.objective == 'grpo':
    return f'reward {metrics["reward_mean"]:.4f} (last round)'
  line = f'held-out {cfg.train.objective} loss {metrics["eval_loss"]:.4f}'
  if 'eval_reward_accuracy' in metrics:
    line += (f', reward accuracy {metrics["eval_reward_accuracy"]:.3f}, '
             f'margin {metrics["eval_reward_margin"]:.4f}')
  return line


def diverged_message(cfg, step: int, metrics: dict, ckpt: Checkpointer) -> str:
  """What the last skipped step got wrong, in the order the guard checks it."""
  latest = ckpt.latest_step()
  if not math.isfinite(metrics['loss']):
    what = f'a non-finite loss ({metrics["loss"]:.4g})'
  elif not math.isfinite(metrics['grad_norm']):
    what = f'a non-finite gradient (norm {metrics["grad_norm"]:.4g})'
  elif metrics.get('nonfinite_weights'):
    what = (f'an update that made weights non-finite (loss {metrics["loss"]:.4g}, grad norm '
            f'{metrics["grad_norm"]:.4g}): the learning rate is too large')
  else:
    what = f'a loss spike (loss {metrics["loss"]:.4g}, train.spike_zscore={cfg.train.spike_zscore:g})'
  return (f'step {step}: {int(metrics["bad_streak"])} consecutive steps were skipped, the last for '
          f'{what}; checkpoints hold only accepted, finite updates (latest: '
          f'{"none" if latest is None else f"step {latest}"}); lower optimizer.lr, check the data '
          'or raise train.max_bad_steps')
