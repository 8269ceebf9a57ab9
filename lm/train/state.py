"""The train state: parameters (flat names, lm/model/spec.py), optimizer state and the guard's
state. It is created as shapes first (`jax.eval_shape`), then jitted into place with its shardings.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from lm import sharding as sharding_lib
from lm.model.spec import ModelSpec  # pylint: disable=unused-import (re-exported)
from lm.train import guard as guard_lib
from lm.train import offload
from lm.train.partition import TRAINABLE


@struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  opt_state: Any
  guard: guard_lib.GuardState  # the numerical guard's window and counters (lm/train/guard.py)


def state_shardings(abstract_state: TrainState, param_shardings: dict, mesh) -> TrainState:
  """Optimizer moments take the sharding of the parameter they belong to; scalars replicate."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def for_leaf(path, leaf):
    for key in reversed(path):
      name = getattr(key, 'key', None)
      if name in param_shardings and abstract_state.params[name].shape == leaf.shape:
        return param_shardings[name]
    return replicated

  return TrainState(step=replicated, params=param_shardings,
                    opt_state=jax.tree_util.tree_map_with_path(for_leaf, abstract_state.opt_state),
                    guard=jax.tree.map(lambda _: replicated, abstract_state.guard))


def new_train_state(params: dict, tx: optax.GradientTransformation, guard_window: int) -> TrainState:
  """The state at step 0: `params`, fresh optimizer state, an empty numerical-guard window."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    guard=guard_lib.init(guard_window))


def stored_dtypes(shapes: dict, labels: dict, frozen_dtype: str) -> dict:
  """{name: dtype} for the frozen floating parameters kept in `frozen_dtype` (train.frozen_dtype;
  'param_dtype': none). Quantized values (integers) keep theirs."""
  if frozen_dtype == 'param_dtype':
    return {}
  return {n: jnp.dtype(frozen_dtype) for n, s in shapes.items()
          if labels[n] != TRAINABLE and jnp.issubdtype(s.dtype, jnp.floating)}


def train_state_factory(spec: ModelSpec, tx: optax.GradientTransformation, mesh, rules, *,
                        guard_window: int = 1, dtypes: dict | None = None,
                        host_optimizer: bool = False):
  """(init(rng) -> state placed on the mesh, abstract state, shardings).

  The state is known as shapes first; `init` is jitted with the shardings as outputs, so no
  array is ever materialised whole on one device. `dtypes`: {name: dtype} the state stores some
  parameters in (stored_dtypes). `host_optimizer`: the optimizer state in pinned host memory
  (lm/train/offload.py).
  """
  param_sh = sharding_lib.param_shardings(spec.logical_axes, spec.shapes, mesh, rules)
  dtypes = dtypes or {}

  def init(rng, loaded=None):
    """`loaded`: starting weights for some parameters (lm/io/pretrained.py), donated."""
    params = spec.init(rng, loaded)
    params = {n: v.astype(dtypes[n]) if n in dtypes else v for n, v in params.items()}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      guard=guard_lib.init(guard_window))

  abstract = jax.eval_shape(init, jax.random.key(0))
  shardings = state_shardings(abstract, param_sh, mesh)
  if host_optimizer:
    shardings = shardings.replace(opt_state=offload.host_shardings(shardings.opt_state))
  return jax.jit(init, out_shardings=shardings, donate_argnums=1), abstract, shardings


def abstract_with_shardings(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
