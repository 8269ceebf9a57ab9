"""`lm plan`: compile the exact train step for a TPU or GPU target on this host, and say whether
it fits, what it costs and how fast it would run.

The step is the one `lm train` runs (lm.Trainer with the target's compile-only devices, so every
mode: full, LoRA, frozen layers, DPO); the compiler for the target (libtpu, or the CUDA plugin with
a GpuTargetConfigProto) does the lowering and the buffer assignment, so the memory figures are the
compiler's, not an estimate. FLOPs are analytic (lm/train/step_flops.py); step time and tokens/s
follow at a stated MFU.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time

from lm import platforms

platforms.load_compilers()  # the CUDA compiler, for GPU targets, before jax starts (lm/platforms.py)

import jax  # noqa: E402  pylint: disable=wrong-import-position
import numpy as np

from lm.train import step_flops as flops_lib
from lm.config import head_dim
from lm.bench import targets as targets_lib
from lm.data.packing import DTYPES
from lm.errors import ConfigError, UserError
from lm.model import attention as attention_lib
from lm.train import partition
from lm.train.state import abstract_with_shardings

GiB = 2 ** 30
REMAT_POLICIES = ('none', 'dots_no_batch', 'dots', 'full')  # least recompute first


@dataclasses.dataclass
class Plan:
  target: targets_lib.Target
  mesh: dict
  batch_size: int
  microbatches: int
  seq_len: int
  remat: str
  attention: str  # what 'auto' (or the config) resolves to on the target
  trainable: int
  total_params: int
  params_bytes: int  # per device, and the rest likewise
  optimizer_bytes: int
  gradient_bytes: int
  temporaries_bytes: int  # total - parameters - optimizer state: gradients, activations, workspace
  total_bytes: int  # what the compiled step needs per device (device_bytes)
  fits: bool
  compile_s: float
  flops: flops_lib.StepFlops | None = None
  mfu: float = 0.4
  host_bytes: int = 0  # per device, in host memory (train.offload=host: the optimizer state)
  optimizer_on_host: bool = False

  @property
  def step_s(self) -> float:
    return self.flops.model / (self.mfu * self.target.peak_flops * self.target.device_count)

  @property
  def memory_line(self) -> str:
    t = self.target
    verdict = 'fits' if self.fits else 'does not fit'
    return (f'{t.name}: needs {self.total_bytes / GiB:.1f} GiB per {t.device_word} of '
            f'{t.hbm_bytes / GiB:.1f}: {verdict}')

  def render(self) -> str:
    t, f = self.target, self.flops
    per = t.device_word
    lines = [
        f'target {t.name}: {t.device_count} x {t.chip} ({t.groups} '
        f'{"slice" if t.platform == "tpu" else "host"}{"s" if t.groups > 1 else ""}), '
        f'{t.hbm_bytes / GiB:.1f} GiB and {t.peak_flops / 1e12:.0f} TFLOP/s bf16 per {per}; '
        f'mesh {self.mesh}',
        f'step: batch {self.batch_size} x {self.seq_len} tokens, {self.microbatches} microbatch'
        f'{"es" if self.microbatches > 1 else ""}, remat {self.remat}, attention {self.attention}; '
        f'compiled in {self.compile_s:.1f}s',
        f'parameters: {self.trainable:,} trainable of {self.total_params:,} '
        f'({100 * self.trainable / self.total_params:.2f}%)',
        f'memory per {per}:',
        f'  parameters            {self.params_bytes / GiB:8.2f} GiB',
        f'  optimizer state       {self.optimizer_bytes / GiB:8.2f} GiB'
        + ('  (in host memory, not in the total)' if self.optimizer_on_host else ''),
        f'  gradients             {self.gradient_bytes / GiB:8.2f} GiB  (held in the temporaries)',
        f'  activations and other {max(self.temporaries_bytes - self.gradient_bytes, 0) / GiB:8.2f} GiB',
        f'  total                 {self.total_bytes / GiB:8.2f} GiB of {t.hbm_bytes / GiB:.1f}: '
        f'{"fits" if self.fits else "DOES NOT FIT"}',
    ]
    if self.host_bytes:
      lines.append(f'host memory per {per}: {self.host_bytes / GiB:.2f} GiB (pinned)')
    if f is not None:
      lines += [
          f'FLOPs per step: {_flops(f.model)} (forward {_flops(f.forward)}, input gradients '
          f'{_flops(f.input_grads)}, weight gradients {_flops(f.weight_grads)}'
          + (f', reference forward {_flops(f.reference)}' if f.reference else '')
          + f'); executed with remat recompute: {_flops(f.hardware)}',
          f'at {self.mfu:.0%} MFU: {self.step_s * 1e3:,.3g} ms per step, '
          f'{f.tokens / self.step_s:,.0f} tokens/s ({f.tokens / self.step_s / t.device_count:,.0f} '
          f'per {per})',
      ]
    return '\n'.join(lines)


def _flops(x: float) -> str:
  return f'{x / 1e12:,.1f} TFLOP' if x >= 1e11 else f'{x / 1e9:,.2f} GFLOP'


def abstract_batch(cfg, sharding) -> dict:
  """The batch the step takes, as shapes: LM rows, or chosen_/rejected_ rows for DPO."""
  B, T = cfg.data.batch_size, cfg.data.seq_len
  prefixes = ('chosen_', 'rejected_') if cfg.train.objective == 'dpo' else ('',)
  return {p + k: jax.ShapeDtypeStruct((B, T), np.dtype(d), sharding=sharding)
          for p in prefixes for k, d in DTYPES.items()}


def _shard_bytes(tree, shardings) -> int:
  # Bits, not itemsize: a QLoRA base's uint4 values take one byte each in numpy but are packed
  # two to a byte on GPU and TPU.
  leaves = jax.tree.leaves(jax.tree.map(
      lambda x, s: math.prod(s.shard_shape(x.shape)) * jax.dtypes.itemsize_bits(x.dtype) / 8,
      tree, shardings))
  return int(sum(leaves))


# The two ways libtpu has said how much a step needs: 'Used 99.1G of 95.7G hbm', and 'the total
# memory required for HLO temporaries (98.92G) exceeds available HBM (95.74G)'.
_HBM_USED = re.compile(r'Used ([\d.]+)([KMGT]) of [\d.]+[KMGT] hbm'
                       r'|required for HLO temporaries \(([\d.]+)([KMGT])\) exceeds')


def _out_of_memory(error: Exception) -> int | None:
  """Bytes per device the compiler said it needed, if `error` is an out-of-memory compile."""
  text = str(error)
  if 'RESOURCE_EXHAUSTED' not in text and 'Ran out of memory' not in text:
    return None
  used = _HBM_USED.search(text)
  if not used:
    return -1
  amount, unit = used.group(1, 2) if used.group(1) else used.group(3, 4)
  return int(float(amount) * {'K': 2 ** 10, 'M': 2 ** 20, 'G': 2 ** 30, 'T': 2 ** 40}[unit])


def device_bytes(memory, platform: str) -> int:
  """Per-device bytes the compiled step needs, from its memory_analysis().

  On TPU this is the compiler's own peak (`peak_memory_in_bytes`), the figure libtpu compares with
  HBM when it accepts or refuses a program: a 4-layer 8B-shaped step of batch 720 x 2048 on v5p
  compiled with a peak of 89.8 GiB while arguments + temporaries came to 109.0 GiB, and at batch 800
  it was refused for needing 98.92G: the temporaries' size exceeds what is ever live at once.
  Elsewhere (GPU: the temporaries are one allocation) it is arguments + outputs +
  temporaries - donated."""
  peak = getattr(memory, 'peak_memory_in_bytes', 0)
  if platform == 'tpu' and peak > 0:
    return peak
  return (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
          + memory.temp_size_in_bytes)


def host_bytes(memory) -> int:
  """Per-device bytes the compiled step keeps in host memory (pinned_host buffers)."""
  get = lambda name: getattr(memory, name, 0) or 0
  return (get('host_argument_size_in_bytes') + get('host_output_size_in_bytes')
          - get('host_alias_size_in_bytes') + get('host_temp_size_in_bytes'))


def compile_step(cfg, target: targets_lib.Target, devices=None, *, mfu: float = 0.4) -> Plan:
  """Compiles `cfg`'s train step for `target`; the Plan says what it needs per device."""
  from lm.train.loop import Trainer  # pylint: disable=import-outside-toplevel
  devices = target.devices() if devices is None else devices
  try:
    trainer = Trainer(cfg, devices=devices)
  except ConfigError as e:
    raise ConfigError(f'{target.name} ({len(devices)} devices): {e}') from None
  state = abstract_with_shardings(trainer.abstract_state, trainer.shardings)
  batch = abstract_batch(cfg, trainer.batch_sharding)
  start = time.perf_counter()
  lowered = trainer.step.lower(state, batch)
  needed = None
  try:
    memory = lowered.compile().memory_analysis()
  except Exception as e:  # pylint: disable=broad-except
    needed = _out_of_memory(e)
    if needed is None and 'INTERNAL' in str(e):  # the compiler's own failure, not lm's nor the config's
      first = str(e).strip().splitlines()[0][:240]
      raise ConfigError(f'{target.name}: the XLA compiler failed on this step ({first}); the '
                        'compiler, not the config, is at fault: try another mesh shape or '
                        'model.attention') from None
    if needed is None:
      raise
  compile_s = time.perf_counter() - start
  with jax.set_mesh(trainer.mesh):
    attention = _resolved_attention(cfg)

  labels = trainer.labels
  trainable, total = partition.trainable_count(trainer.spec.shapes, labels, trainer.row_masks)
  params_bytes = _shard_bytes(state.params, trainer.shardings.params)
  optimizer_bytes = _shard_bytes(state.opt_state, trainer.shardings.opt_state)
  gradient_bytes = _shard_bytes({k: v for k, v in state.params.items() if labels[k] == partition.TRAINABLE},
                                {k: v for k, v in trainer.shardings.params.items()
                                 if labels[k] == partition.TRAINABLE})
  if needed is None:
    total_bytes = device_bytes(memory, target.platform)
  else:  # the TPU compiler refuses a step over HBM; it says how much it wanted when it can
    total_bytes = needed if needed > 0 else target.hbm_bytes + 1
  on_host = cfg.train.offload == 'host'
  temporaries = max(total_bytes - params_bytes - (0 if on_host else optimizer_bytes), 0)
  return Plan(target=target, mesh=dict(trainer.mesh.shape), batch_size=cfg.data.batch_size,
              microbatches=cfg.train.microbatches, seq_len=cfg.data.seq_len, remat=cfg.model.remat,
              attention=attention, trainable=trainable, total_params=total,
              params_bytes=params_bytes, optimizer_bytes=optimizer_bytes,
              gradient_bytes=gradient_bytes, temporaries_bytes=temporaries, total_bytes=total_bytes,
              fits=needed is None and total_bytes <= target.hbm_bytes, compile_s=compile_s,
              flops=flops_lib.step_flops(trainer), mfu=mfu,
              host_bytes=0 if needed is not None else host_bytes(memory),
              optimizer_on_host=on_host)


def _resolved_attention(cfg) -> str:
  if cfg.model.attention != 'auto':
    return cfg.model.attention
  m = cfg.model
  q = jax.ShapeDtypeStruct((1, cfg.data.seq_len, m.n_heads, head_dim(m)), np.dtype(m.compute_dtype))
  return 'auto: ' + attention_lib.choose_implementation(q, q)


def plan(cfg, target: str, *, mfu: float = 0.4, search: bool = False, log=print) -> Plan:
  """Compiles `cfg`'s step for `target` (e.g. 'v5p-8', 'h100x8') and returns the Plan; with
  `search`, also tries remat policies and batch sizes and logs the largest batch that fits."""
  if not 0 < mfu <= 1:
    raise UserError(f'--mfu {mfu}: give a fraction in (0, 1], e.g. 0.4')
  target_info = targets_lib.parse(target)
  devices = target_info.devices()
  result = compile_step(cfg, target_info, devices, mfu=mfu)
  log(result.render())
  if search:
    for line in search_batches(cfg, target_info, devices):
      log(line)
  return result


def search_batches(cfg, target, devices):
  """Per remat policy, the largest microbatch (in sequences) that fits, found by doubling; yields
  one line per policy and a config that reaches the configured global batch."""
  from lm import sharding as sharding_lib  # pylint: disable=import-outside-toplevel
  mesh = sharding_lib.make_mesh(cfg.mesh, devices)
  step = sharding_lib.data_parallel_size(mesh, tuple(cfg.mesh.rules))
  yield f'search: largest microbatch that fits, per remat policy (steps of {step} sequences)'
  best = None
  for remat in REMAT_POLICIES:
    largest, plan_at, micro = None, None, step
    while micro <= 4096:
      trial = _with(cfg, remat=remat, batch_size=micro, microbatches=1)
      result = compile_step(trial, target, devices)
      if not result.fits:
        break
      largest, plan_at = micro, result
      micro *= 2
    if largest is None:
      yield f'  remat {remat:13s} nothing fits: {result.memory_line}'
      continue
    recompute = plan_at.flops.hardware / plan_at.flops.model - 1
    yield (f'  remat {remat:13s} {largest:5d} sequences x {cfg.data.seq_len} tokens: '
           f'{plan_at.total_bytes / GiB:.1f} GiB per {target.device_word}, '
           f'+{recompute:.0%} FLOPs recomputed')
    if best is None:
      best = (remat, largest)
  if best is None:  # a search that found nothing is a failed plan, not a report: exit 2
    raise UserError(f'{target.name}: not even {step} sequences of {cfg.data.seq_len} tokens per '
                    'microbatch fit at any remat policy; use a larger target, more model '
                    'parallelism (mesh.shape.fsdp / tensor), a smaller model or a shorter data.seq_len')
  if best is not None:
    remat, largest = best
    k = max(1, -(-cfg.data.batch_size // largest))
    while cfg.data.batch_size % k or (cfg.data.batch_size // k) % step:
      k += 1
      if k > cfg.data.batch_size:
        break
    yield (f'for data.batch_size={cfg.data.batch_size}: --config.model.remat={remat} '
           f'--config.train.microbatches={k} (least recompute that fits)')


def _with(cfg, *, remat, batch_size, microbatches):
  trial = cfg.copy_and_resolve_references()
  trial.unlock()
  trial.model.remat = remat
  trial.data.batch_size = batch_size
  trial.train.microbatches = microbatches
  trial.lock()
  return trial


def fit_or_raise(result: Plan) -> None:
  """The one-line error for a step that does not fit its target."""
  if not result.fits:
    raise UserError(result.memory_line)
