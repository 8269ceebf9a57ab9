"""Hardware targets `lm plan` compiles for, as data: TPU topologies and GPU target configs.

A target name is what a user rents: `v5p-8`, `v6e-8`, `v5e-16`, `v4-8` (Cloud TPU names: v4 and
v5p count TensorCores, two per chip; v5e and v6e count chips), `h100x8`, `h200x8` (GPUs on one
host). A prefix `Nx` asks for N of them: `2xv5p-8` is two slices (multi-slice, over DCN),
`2xh100x8` two hosts of eight GPUs.

`Target.devices()` returns compile-only devices from the real compilers (libtpu for TPU, the CUDA
PJRT plugin with a GpuTargetConfigProto for GPU), so the step compiles for the target on a CPU host.
Memory sizes and peak FLOP/s are vendor datasheet figures (bf16 dense, per chip).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re

from lm import platforms
from lm.errors import UserError

platforms.load_compilers()  # the CUDA compiler, for GPU targets, before jax starts (lm/platforms.py)

GiB = 2 ** 30

# chip -> how Cloud TPU names count it, its topology, HBM per chip and peak bf16 FLOP/s per chip.
TPU_CHIPS = {
    'v4': dict(cores_per_chip=2, dims=3, hbm_bytes=32 * GiB, peak_flops=275e12,
               kwargs=dict(chip_config_name='megacore')),
    'v5p': dict(cores_per_chip=2, dims=3, hbm_bytes=95 * GiB, peak_flops=459e12, kwargs={}),
    'v5e': dict(cores_per_chip=1, dims=2, hbm_bytes=16 * GiB, peak_flops=197e12, kwargs={}),
    'v6e': dict(cores_per_chip=1, dims=2, hbm_bytes=32 * GiB, peak_flops=918e12, kwargs={}),
}

# GPU -> its GpuTargetConfigProto (lm/bench/gpu_specs/, from openxla/xla), memory and peak FLOP/s.
# Memory is the spec's device_memory_size; peak is the SXM datasheet's dense bf16 figure.
GPUS = {
    'h100': dict(spec='h100_sxm.txtpb', hbm_bytes=84942979072, peak_flops=989e12),
    'h200': dict(spec='h200.txtpb', hbm_bytes=151397597184, peak_flops=989e12),
}

EXAMPLES = 'v5p-8, v6e-8, v5e-16, v4-8, h100x8, h200x8, 2xv5p-8 (two slices), 2xh100x8 (two hosts)'


@dataclasses.dataclass(frozen=True)
class Target:
  name: str
  platform: str  # 'tpu' | 'gpu': what the kernels lower for and 'auto' attention decides on
  chip: str
  chips: int  # chips (TPU) or GPUs per slice / host
  groups: int  # slices (TPU) or hosts (GPU)
  hbm_bytes: int  # per chip
  peak_flops: float  # per chip, bf16 dense

  @property
  def device_count(self) -> int:
    return self.chips * self.groups

  @property
  def device_word(self) -> str:
    return 'chip' if self.platform == 'tpu' else 'GPU'

  def devices(self) -> list:
    """Compile-only devices of this target (no hardware needed)."""
    return list(_topology(self.name).devices)


def tpu_shape(chips: int, dims: int) -> tuple[int, ...]:
  """Chip grid of a Cloud TPU slice: v4/v5p 2x2x1, 2x2x2, 2x2x4, 2x4x4, ...; v5e/v6e 2x2, 2x4, 4x4."""
  if chips & (chips - 1):
    raise UserError(f'{chips} chips: TPU slices have a power-of-two chip count')
  if chips == 1:
    return (1,) * dims
  if chips == 2:
    return (1, 2, 1)[:dims] if dims == 3 else (1, 2)
  shape = [2, 2] + [1] * (dims - 2)
  while math.prod(shape) < chips:
    i = max(j for j in range(dims) if shape[j] == min(shape))  # grow the last of the smallest
    shape[i] *= 2
  return tuple(shape)


def parse(name: str) -> Target:
  """'2xv5p-8' -> Target; an unknown name is one line listing the known forms."""
  text = name.strip().lower()
  groups, rest = 1, text
  prefix = re.fullmatch(r'(\d+)x(.+)', text)
  if prefix:
    groups, rest = int(prefix.group(1)), prefix.group(2)
  tpu = re.fullmatch(r'(v4|v5p|v5e|v6e)-(\d+)', rest)
  gpu = re.fullmatch(r'(h100|h200)x(\d+)', rest)
  if groups < 1 or not (tpu or gpu):
    raise UserError(f'unknown target {name!r}; targets look like {EXAMPLES}')
  if tpu:
    chip, count = tpu.group(1), int(tpu.group(2))
    info = TPU_CHIPS[chip]
    if count % info['cores_per_chip'] or count < info['cores_per_chip']:
      raise UserError(f'{name}: {chip} slices are named by TensorCores, two per chip '
                      f'(v5p-8 is 4 chips); use an even count')
    chips = count // info['cores_per_chip']
    if chips & (chips - 1):
      raise UserError(f'{name}: {chips} chips; TPU slices have a power-of-two chip count')
    return Target(text, 'tpu', chip, chips, groups, info['hbm_bytes'], info['peak_flops'])
  chip, count = gpu.group(1), int(gpu.group(2))
  if not 1 <= count <= 8:
    raise UserError(f'{name}: a host has 1 to 8 GPUs; ask for more hosts with a prefix, e.g. 2x{chip}x8')
  info = GPUS[chip]
  return Target(text, 'gpu', chip, count, groups, info['hbm_bytes'], info['peak_flops'])


def gpu_spec_text(chip: str) -> str:
  with open(os.path.join(os.path.dirname(__file__), 'gpu_specs', GPUS[chip]['spec']),
            encoding='utf-8') as f:
    return f.read()


@functools.lru_cache(maxsize=None)
def _topology(name: str):
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  target = parse(name)
  # libtpu takes a machine-wide lock for the real chips; compile-only use needs none, and another
  # process (a test worker, a second plan) may hold it.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  if target.platform == 'gpu' and platforms.compilers_hidden():
    raise UserError(f'{name}: the CUDA compiler was kept unloaded (jax started after `import lm` '
                    'on this CPU host); import lm.bench.plan before the first jax call, or set '
                    'JAX_PLATFORMS=cpu before importing lm')
  try:
    if target.platform == 'tpu':
      info = TPU_CHIPS[target.chip]
      shape = tpu_shape(target.chips, info['dims'])
      kwargs = dict(info['kwargs'])
      if target.chips == 1:
        kwargs['chips_per_host_bounds'] = (1, 1, 1)
      if target.groups > 1:
        kwargs['num_slices'] = target.groups
      return topologies.get_topology_desc(platform='tpu', topology_name=(
          f'{target.chip}:' + 'x'.join(map(str, shape))), **kwargs)
    return topologies.get_topology_desc(platform='cuda', target_config=gpu_spec_text(target.chip),
                                        topology=f'1x{target.groups}x{target.chips}')
  except (RuntimeError, NotImplementedError, ValueError) as e:
    package = 'libtpu' if target.platform == 'tpu' else 'jax-cuda12-plugin and jax-cuda12-pjrt'
    first = (str(e).splitlines() or [''])[0]
    raise UserError(f'{name}: cannot build the {target.platform.upper()} compiler\'s devices '
                    f'({first}); install {package} at jax\'s version: pip install "lm[plan]"') from None
