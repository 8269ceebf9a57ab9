"""Device mesh from config, and logical-axis -> mesh-axis shardings for parameters and batches."""

from __future__ import annotations

import contextlib
import contextvars
import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lm.errors import ConfigError


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """A mesh with the configured axes; one axis of size -1 takes the remaining devices."""
  devices = jax.devices() if devices is None else devices
  names = tuple(mesh_cfg.shape.keys())
  sizes = [int(mesh_cfg.shape[n]) for n in names]
  n = len(devices)
  if sizes.count(-1) > 1:
    raise ConfigError(f'mesh.shape={dict(zip(names, sizes))}: at most one axis may be -1; give the '
                      'others fixed sizes')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if n % known:
      raise ConfigError(f'mesh.shape={dict(zip(names, sizes))} does not divide {n} devices; '
                        f'make the fixed axes multiply to a divisor of {n}')
    sizes[sizes.index(-1)] = n // known
  if math.prod(sizes) != n:
    raise ConfigError(f'mesh.shape={dict(zip(names, sizes))} needs {math.prod(sizes)} devices '
                      f'but {n} are present; set one axis to -1 to fill the rest')
  return Mesh(np.asarray(devices).reshape(sizes), names)


def logical_to_mesh_spec(logical_axes, rules) -> P:
  """('embed', 'mlp') -> P('fsdp', 'tensor') by the first matching rule; unknown axes replicate."""
  table = dict(rules)
  used, spec = set(), []
  for name in logical_axes:
    mesh_axes = table.get(name)
    if mesh_axes is None:
      spec.append(None)
      continue
    mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    mesh_axes = tuple(a for a in mesh_axes if a not in used)  # a mesh axis shards one dim only
    used.update(mesh_axes)
    spec.append(mesh_axes if len(mesh_axes) > 1 else (mesh_axes[0] if mesh_axes else None))
  return P(*spec)


def fit_spec(spec: P, shape, mesh: Mesh) -> P:
  """Drops mesh axes from dims they do not divide (e.g. 2 KV heads over 4-way tensor), so small
  or odd shapes replicate instead of failing to compile."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      out.append(None)
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    kept = []
    for a in axes:
      if dim % (math.prod(mesh.shape[k] for k in kept) * mesh.shape[a]) == 0:
        kept.append(a)
    out.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
  return P(*out)


def param_shardings(logical_axes: dict, shapes: dict, mesh: Mesh, rules) -> dict:
  """Flat {name: logical axes} and {name: ShapeDtypeStruct} -> {name: NamedSharding}."""
  return {name: NamedSharding(mesh, fit_spec(logical_to_mesh_spec(axes, rules), shapes[name].shape, mesh))
          for name, axes in logical_axes.items()}


def batch_axes(mesh: Mesh, rules) -> tuple:
  spec = logical_to_mesh_spec(('batch',), rules)[0]
  axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
  return tuple(a for a in axes if a in mesh.shape)


def data_parallel_size(mesh: Mesh, rules) -> int:
  return math.prod(mesh.shape[a] for a in batch_axes(mesh, rules))


CONTEXT_AXIS = 'context'  # splits the sequence (length) dim: context parallelism


def context_parallel_size(mesh: Mesh) -> int:
  return mesh.shape.get(CONTEXT_AXIS, 1)


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
  """Batches are split along their leading (batch) dim over the data-parallel axes, and along
  the sequence over the context axis where it has more than one device."""
  axes = batch_axes(mesh, rules)
  rows = axes if len(axes) > 1 else (axes[0] if axes else None)
  if context_parallel_size(mesh) > 1:
    return NamedSharding(mesh, P(rows, CONTEXT_AXIS))
  return NamedSharding(mesh, P(rows))


def check_context_divides(seq_len: int, mesh: Mesh) -> None:
  cp = context_parallel_size(mesh)
  if seq_len % cp:
    raise ConfigError(f'data.seq_len={seq_len} does not split over mesh.shape.context={cp}; use a '
                      f'sequence length that is a multiple of {cp}')


def check_batch_divides(batch_size: int, microbatches: int, mesh: Mesh, rules) -> None:
  dp = data_parallel_size(mesh, rules)
  per_micro = batch_size // microbatches
  if per_micro % dp:
    raise ConfigError(
        f'data.batch_size={batch_size} / train.microbatches={microbatches} = {per_micro} sequences per '
        f'microbatch is not divisible by the {dp}-way data parallelism of mesh {dict(mesh.shape)}; '
        f'use a batch size that is a multiple of {dp * microbatches}')


# The mesh and rules of the step being traced (Trainer sets them), so code deep inside the model
# and the loss can pin an intermediate's sharding by logical axis names.
_ACTIVE = contextvars.ContextVar('lm_activation_sharding', default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules):
  """Within this context, `constrain` maps logical axes to `mesh` by `rules`."""
  token = _ACTIVE.set((mesh, tuple(rules)))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def constrain(x, logical_axes):
  """`x` pinned to the mesh axes its logical axes map to, inside activation_sharding; else `x`.

  For intermediates whose sharding XLA's propagation would otherwise choose badly, e.g. inside a
  loop, where it may prefer replicating a large temporary to moving a small one."""
  active = _ACTIVE.get()
  if active is None:
    return x
  mesh, rules = active
  spec = fit_spec(logical_to_mesh_spec(logical_axes, rules), x.shape, mesh)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
class InMesh:
  """A jitted function traced and run with `mesh` in context (jax.set_mesh), so code inside it
  (the Pallas attention's shard_map, lm/model/attention.py) sees the mesh and its devices."""

  def __init__(self, jitted, mesh: Mesh):
    self.jitted, self.mesh = jitted, mesh

  def __call__(self, *args, **kwargs):
    with jax.set_mesh(self.mesh):
      return self.jitted(*args, **kwargs)

  def lower(self, *args, **kwargs):
    with jax.set_mesh(self.mesh):
      return self.jitted.lower(*args, **kwargs)


def target() -> tuple[str, int]:
  """(platform, device count) the code being traced will run on: 'tpu' | 'gpu' | 'cpu'.

  Inside a mesh context (lm's Trainer sets its mesh around its step) this is the mesh's devices,
  so a step compiled for a TPU or GPU target on a CPU host (lm plan) decides as the real run
  would; without one, this host's default backend.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:
    device = mesh.abstract_device
    platform = device.platform if device is not None else jax.default_backend()
    return ('gpu' if platform in ('cuda', 'rocm') else platform), mesh.size
  return jax.default_backend(), jax.device_count()
