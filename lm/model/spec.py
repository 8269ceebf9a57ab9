"""The model as data: a spec (graph + parameter names, shapes, logical axes) known before any
parameter exists.

Parameters live as a flat dict `{'layers.attn.q.kernel': array, ...}` so that partitions, sharding
rules, checkpoints and HF conversion all address them by one readable name. Besides the model's
own: `ref.<name>` (full-weight DPO's frozen reference), `teacher.<name>` (a distillation teacher,
its own shapes) and, for QLoRA, quantized kernels with their scales.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from flax import traverse_util

from lm.config import with_model_defaults
from lm.model import quant
from lm.model.lora import is_adapter, without_adapters
from lm.model.layers import Linear
from lm.model.transformer import Transformer

REF_PREFIX = REF = 'ref.'  # a frozen copy of a base weight (full-weight DPO's reference policy)
TEACHER_PREFIX = TEACHER = 'teacher.'  # a distillation teacher's weights (its own shapes), always frozen
FROZEN_COPIES = (REF_PREFIX, TEACHER_PREFIX)

SEP = '.'


def flatten(nested: dict) -> dict:
  return traverse_util.flatten_dict(nested, sep=SEP)


def unflatten(flat: dict) -> dict:
  return traverse_util.unflatten_dict(flat, sep=SEP)


class ModelSpec:
  """What is known about a model before any parameter exists.

  With `reference=True` the parameters also hold `ref.<name>`, a copy of every base weight that
  stays frozen (lm/train/partition.py never trains it): the reference policy of full-weight DPO.
  With `teacher=<model config>` they hold `teacher.<name>`, the weights of a frozen distillation
  teacher of its own shape (any size, same vocabulary).
  """

  def __init__(self, model_cfg, *, reference: bool = False, teacher=None):
    self.cfg = ml_collections.FrozenConfigDict(with_model_defaults(model_cfg))
    self.reference = reference
    self.teacher_cfg = None if teacher is None else ml_collections.FrozenConfigDict(teacher)
    abstract = nnx.eval_shape(lambda: Transformer(self.cfg, rngs=nnx.Rngs(0)))
    self.graphdef, abstract_state = nnx.split(abstract)
    flat = nnx.to_flat_state(abstract_state)
    self.logical_axes = {SEP.join(map(str, path)): tuple(v.get_metadata().get('out_sharding') or ())
                         for path, v in flat}
    self.shapes = {SEP.join(map(str, path)): v.get_value() for path, v in flat}
    if reference:
      base_cfg = ml_collections.FrozenConfigDict(without_adapters(self.cfg))
      self._ref_graphdef = nnx.split(nnx.eval_shape(
          lambda: Transformer(base_cfg, rngs=nnx.Rngs(0))))[0]
      base = [n for n in self.shapes if not is_adapter(n)]
      self.logical_axes.update({REF + n: self.logical_axes[n] for n in base})
      self.shapes.update({REF + n: self.shapes[n] for n in base})
    # QLoRA: {kernel name: input dims} of the layers' Linear kernels the state holds quantized.
    self.qtype = quant.qtype_of(self.cfg)
    self.quantized = {}
    if self.qtype != 'none':
      block = self.cfg.quant.block
      for path, module in nnx.iter_modules(abstract):
        name = SEP.join(map(str, path)) + SEP + 'kernel'
        if isinstance(module, Linear) and name.startswith('layers.'):
          self.quantized[name] = module.n_in
          shape = self.shapes[name].shape
          self.shapes[name] = jax.ShapeDtypeStruct(
              shape, jnp.uint4 if self.qtype == 'nf4' else jnp.int8)
          self.shapes[name + quant.SCALE_SUFFIX] = jax.ShapeDtypeStruct(
              quant.scale_shape(shape, module.n_in, block), jnp.dtype(self.cfg.param_dtype))
          self.logical_axes[name + quant.SCALE_SUFFIX] = self.logical_axes[name]
    if teacher is not None:
      abstract_teacher = nnx.eval_shape(lambda: Transformer(self.teacher_cfg, rngs=nnx.Rngs(0)))
      self._teacher_graphdef, teacher_state = nnx.split(abstract_teacher)
      for path, v in nnx.to_flat_state(teacher_state):
        name = TEACHER + SEP.join(map(str, path))
        self.logical_axes[name] = tuple(v.get_metadata().get('out_sharding') or ())
        self.shapes[name] = v.get_value()

  @property
  def names(self) -> list[str]:
    return list(self.shapes)

  def init(self, rng, loaded: dict | None = None) -> dict:
    """Fresh parameters; entries of `loaded` (starting weights) replace theirs. Under jit the
    random draws that `loaded` replaces are dropped, never computed."""
    model = Transformer(self.cfg, rngs=nnx.Rngs(params=rng))
    params = flatten(nnx.to_pure_dict(nnx.state(model)))
    params.update(loaded or {})
    if self.reference:
      # The base weights only: a teacher's loaded weights (`teacher.*`) have no reference copy.
      params.update({REF + n: v for n, v in params.items()
                     if not is_adapter(n) and not n.startswith(TEACHER)})
    for name, n_in in self.quantized.items():  # QLoRA: the float base goes, its quantized form stays
      params[name], params[name + quant.SCALE_SUFFIX] = quant.quantize(
          params[name], self.qtype, self.cfg.quant.block, n_in)
    if self.teacher_cfg is not None:  # placeholders until the teacher's weights are loaded
      teacher = Transformer(self.teacher_cfg, rngs=nnx.Rngs(params=jax.random.fold_in(rng, 1)))
      drawn = {TEACHER + n: v for n, v in flatten(nnx.to_pure_dict(nnx.state(teacher))).items()}
      params.update({n: (loaded or {}).get(n, v) for n, v in drawn.items()})
    return params

  def bind(self, params: dict, *, rng=None) -> Transformer:
    """A Transformer whose parameters are `params` (arrays or tracers); cheap, used inside jit.

    `rng` (training only) drives adapter dropout; `ref.*` entries become `model.reference`.
    """
    own = {k: v for k, v in params.items() if not k.startswith((REF, TEACHER))}
    for name in self.quantized:
      own[name] = quant.quantized_array(own[name], own.pop(name + quant.SCALE_SUFFIX), self.qtype)
    model = nnx.merge(self.graphdef, nnx.State(unflatten(own)))
    model.dropout_key = nnx.data(rng)
    if self.reference:
      ref = {k[len(REF):]: v for k, v in params.items() if k.startswith(REF)}
      model.reference = nnx.data(nnx.merge(self._ref_graphdef, nnx.State(unflatten(ref))))
    if self.teacher_cfg is not None:
      weights = {k[len(TEACHER):]: v for k, v in params.items() if k.startswith(TEACHER)}
      model.teacher = nnx.data(nnx.merge(self._teacher_graphdef, nnx.State(unflatten(weights))))
    return model

  def param_count(self) -> int:
    return sum(int(s.size) for n, s in self.shapes.items()
               if not n.startswith((REF, TEACHER)) and not n.endswith(quant.SCALE_SUFFIX))
