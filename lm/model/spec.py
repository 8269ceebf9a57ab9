"""The model as data: a spec (graph + parameter names, shapes, logical axes) known before any
parameter exists.

Parameters live as a flat dict `{'layers.attn.q.kernel': array, ...}` so that partitions, sharding
rules, checkpoints and HF conversion all address them by one readable name.
"""

from __future__ import annotations

import ml_collections
from flax import nnx
from flax import traverse_util

from lm.config import with_model_defaults
from lm.model.lora import is_adapter, without_adapters
from lm.model.transformer import Transformer

# `ref.<name>`: the frozen copy of a base weight (full-weight DPO's reference policy).
REF_PREFIX = REF = 'ref.'

SEP = '.'


def flatten(nested: dict) -> dict:
  return traverse_util.flatten_dict(nested, sep=SEP)


def unflatten(flat: dict) -> dict:
  return traverse_util.unflatten_dict(flat, sep=SEP)


class ModelSpec:
  """What is known about a model before any parameter exists.

  With `reference=True` the parameters also hold `ref.<name>`, a copy of every base weight that
  stays frozen (lm/train/partition.py never trains it): the reference policy of full-weight DPO.
  """

  def __init__(self, model_cfg, *, reference: bool = False):
    self.cfg = ml_collections.FrozenConfigDict(with_model_defaults(model_cfg))
    self.reference = reference
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
      params.update({REF + n: v for n, v in params.items() if not is_adapter(n)})
    return params

  def bind(self, params: dict, *, rng=None) -> Transformer:
    """A Transformer whose parameters are `params` (arrays or tracers); cheap, used inside jit.

    `rng` (training only) drives adapter dropout; `ref.*` entries become `model.reference`.
    """
    own = {k: v for k, v in params.items() if not k.startswith(REF)}
    model = nnx.merge(self.graphdef, nnx.State(unflatten(own)))
    model.dropout_key = nnx.data(rng)
    if self.reference:
      ref = {k[len(REF):]: v for k, v in params.items() if k.startswith(REF)}
      model.reference = nnx.data(nnx.merge(self._ref_graphdef, nnx.State(unflatten(ref))))
    return model

  def param_count(self) -> int:
    return sum(int(s.size) for n, s in self.shapes.items() if not n.startswith(REF))
