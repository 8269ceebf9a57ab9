"""Several named LoRA adapters over one set of base weights, switched without reloading the base."""

from __future__ import annotations

import json

from lm.errors import CheckpointError
from lm.model.lora import is_adapter, split, with_adapters, without_adapters
from lm.model.spec import ModelSpec


class AdapterSet:
  """Several named adapters over one set of base weights, switched without reloading the base.

  The base arrays are shared by every adapter's params dict (no copy); switching builds a new
  dict of references plus that adapter's few entries.

    bank = AdapterSet(model_cfg, base_params)
    bank.add('sql', adapter, {'rank': 8, 'alpha': 16.0, 'targets': 'attn'})
    logits = bank.model('sql')(tokens)      # bank.model(None): the base alone
  """

  def __init__(self, model_cfg, base_params: dict):
    self._spec_cls = ModelSpec
    self.model_cfg = without_adapters(model_cfg)
    self.base = split(base_params)[0]
    self.adapters, self._specs = {}, {}

  def add(self, name: str, adapter: dict, lora: dict) -> None:
    cfg = with_adapters(self.model_cfg, lora)
    key = json.dumps(cfg.lora.to_dict(), sort_keys=True)
    if key not in self._specs:
      self._specs[key] = self._spec_cls(cfg)
    spec = self._specs[key]
    wanted = {k for k in spec.names if is_adapter(k)}
    if set(adapter) != wanted:
      raise CheckpointError(f'adapter {name!r} does not fit its lora config: has '
                            f'{sorted(set(adapter) - wanted)[:3]}, lacks {sorted(wanted - set(adapter))[:3]}')
    self.adapters[name] = (spec, dict(adapter))

  def params(self, name: str | None) -> dict:
    return dict(self.base) if name is None else {**self.base, **self.adapters[name][1]}

  def spec(self, name: str | None):
    if name is None:
      key = 'base'
      if key not in self._specs:
        self._specs[key] = self._spec_cls(self.model_cfg)
      return self._specs[key]
    return self.adapters[name][0]

  def model(self, name: str | None):
    return self.spec(name).bind(self.params(name))
