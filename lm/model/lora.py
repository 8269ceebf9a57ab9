"""LoRA adapters as parameters: merge and unmerge, named adapters on one base, PEFT files.

Adapters live in the model (lm/model/transformer.py `Linear`: `<module>.lora_a` [*in, r] and
`<module>.lora_b` [r, *out], stacked over layers like every layer weight) and train through the
`lora` partition, so a LoRA run is the ordinary step with other labels. Here is what is done to
them outside training. An adapter is the dict of a params dict's `*.lora_a` / `*.lora_b` entries.

Several adapters over one base: lm/model/adapter_set.py. PEFT files: lm/io/peft.py.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections



def is_adapter(name: str) -> bool:
  """Whether a flat parameter name is a LoRA adapter entry."""
  return name.endswith(('.lora_a', '.lora_b'))


def scale(lora_cfg) -> float:
  return lora_cfg.alpha / (math.sqrt(lora_cfg.rank) if lora_cfg.rslora else lora_cfg.rank)


def split(params: dict) -> tuple[dict, dict]:
  """(base weights, adapter entries)."""
  return ({k: v for k, v in params.items() if not is_adapter(k)},
          {k: v for k, v in params.items() if is_adapter(k)})


def modules(adapter: dict) -> list[str]:
  """Adapted modules: 'layers.attn.q', ..."""
  return sorted({k.rsplit('.', 1)[0] for k in adapter})


def delta(a, b, s, stacked: int):
  """s · (A · B): kernel-shaped. a [*batch, *in, r], b [*batch, r, *out], with `stacked` leading
  batch dims (0; 1: layers; 2: layers and experts)."""
  fn = lambda x, y: s * jnp.tensordot(x, y, axes=1)
  for _ in range(int(stacked)):
    fn = jax.vmap(fn)
  return fn(a, b)


def _apply(params: dict, adapter: dict, s: float, sign: float) -> dict:
  out = dict(params)
  for module in modules(adapter):
    kernel = module + '.kernel'
    a, b = adapter[module + '.lora_a'], adapter[module + '.lora_b']
    # Leading dims shared by kernel, A and B (layers; experts): A·B keeps them, the rest multiply.
    stacked = a.ndim + b.ndim - 2 - params[kernel].ndim
    sharding = getattr(params[kernel], 'sharding', None)
    if isinstance(sharding, jax.sharding.NamedSharding):  # adapters may live elsewhere: replicate
      a, b = jax.device_put((a, b), jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec()))
    fn = jax.jit(lambda w, a, b: (w.astype(jnp.float32) + sign * delta(
        a.astype(jnp.float32), b.astype(jnp.float32), s, stacked)).astype(w.dtype),
                 out_shardings=sharding)
    out[kernel] = fn(params[kernel], a, b)
  return out


def merge(params: dict, lora_cfg) -> dict:
  """Base weights with the adapters folded in (W + s·A·B), adapter entries dropped: a plain
  model of the base config. `params` is left untouched; each merged kernel keeps its sharding."""
  base, adapter = split(params)
  return _apply(base, adapter, scale(lora_cfg), 1.0)


def unmerge(merged: dict, adapter: dict, lora_cfg) -> dict:
  """The base weights back from merged ones (W - s·A·B; equal up to float rounding)."""
  return _apply(merged, adapter, scale(lora_cfg), -1.0)


def without_adapters(model_cfg) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(model_cfg.to_dict() if hasattr(model_cfg, 'to_dict') else model_cfg)
  cfg.lora.rank = 0
  return cfg


def with_adapters(model_cfg, lora: dict) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(model_cfg.to_dict() if hasattr(model_cfg, 'to_dict') else model_cfg)
  cfg.lora.update(lora)
  return cfg
