"""`lm bench finetune`: full fine-tuning and LoRA, lm against HF transformers (+ PEFT), one process.

Same shape (default configs/bench_tiny.py), same batch, fp32, AdamW, global-norm clipping, LoRA
rank 16 on every linear layer of the blocks (q, k, v, o, gate, up, down; alpha 32, no dropout)
on both sides. Steps alternate between the four runs in rounds and each run's best round counts,
so a machine shared with other work slows all of them alike.

Memory: on a GPU, each framework's allocator peak. On CPU there is no allocator peak to read, so
both sides report the same account of the step: lm, the buffers of the compiled step (arguments
+ temporaries + outputs not aliased to inputs, from XLA's memory analysis); HF, weights +
optimizer state + gradients + the tensors autograd saved for the backward pass.
"""

from __future__ import annotations

import argparse
import copy
import time

import jax
import numpy as np

from lm.bench import train as bench
from lm.train.loop import Trainer

LORA_TARGETS = r'layers\.(attn|mlp)\.'
HF_TARGETS = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']


def lora_variant(cfg, rank: int):
  c = copy.deepcopy(cfg)
  c.model.lora.update(rank=rank, alpha=2.0 * rank, dropout=0.0, targets=LORA_TARGETS)
  c.train.trainable = 'lora'
  return c


class LmRun:
  def __init__(self, cfg):
    self.trainer = Trainer(cfg)
    self.state = self.trainer.init_state()
    self.batch = self.trainer.global_batch(bench.random_batch(cfg))
    self.summary = self.trainer.trainable_summary()

  def steps(self, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
      self.state, metrics = self.trainer.step(self.state, self.batch)
    jax.block_until_ready((self.state, metrics))
    self.loss = float(metrics['loss'])
    return (time.perf_counter() - start) / n

  def memory(self) -> tuple[float, str]:
    stats = jax.devices()[0].memory_stats() or {}
    if 'peak_bytes_in_use' in stats:
      return stats['peak_bytes_in_use'], 'device peak'
    m = self.trainer.step.lower(self.state, self.batch).compile().memory_analysis()
    return (m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes
            - m.alias_size_in_bytes), 'compiled step buffers'


class HfRun:
  def __init__(self, cfg, lora_rank: int = 0):
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel
    self.torch = torch
    m = cfg.model
    hf_cfg = transformers.LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.mlp_dim,
        num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads,
        num_key_value_heads=m.n_kv_heads, max_position_embeddings=max(m.max_seq_len, cfg.data.seq_len),
        rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta, tie_word_embeddings=m.tie_embeddings)
    self.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_cfg).to(self.device)
    if lora_rank:
      import peft  # pylint: disable=import-outside-toplevel
      model = peft.get_peft_model(model, peft.LoraConfig(
          r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0, target_modules=HF_TARGETS))
    model.train()
    self.model = model
    self.params = [p for p in model.parameters() if p.requires_grad]
    o = cfg.optimizer
    self.opt = torch.optim.AdamW(self.params, lr=o.lr, betas=(o.b1, o.b2), eps=o.eps,
                                 weight_decay=o.weight_decay)
    self.clip = o.grad_clip or 1e9
    batch = bench.random_batch(cfg)
    self.tokens = torch.from_numpy(batch['tokens'].astype(np.int64)).to(self.device)
    self.targets = torch.from_numpy(batch['targets'].astype(np.int64)).to(self.device)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in self.params)
    self.summary = f'{trainable:,} of {total:,} parameters trainable ({100 * trainable / total:.2f}%)'
    self.saved_bytes = 0

  def _step(self):
    torch = self.torch
    logits = self.model(input_ids=self.tokens).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                             self.targets.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.params, self.clip)
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    return loss

  def steps(self, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
      loss = self._step()
    self.loss = float(loss.detach())
    if self.device == 'cuda':
      self.torch.cuda.synchronize()
    return (time.perf_counter() - start) / n

  def memory(self) -> tuple[float, str]:
    torch = self.torch
    if self.device == 'cuda':
      return torch.cuda.max_memory_allocated(), 'device peak'
    seen, saved = set(), [0]

    def pack(t):
      key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
      if key not in seen:
        seen.add(key)
        saved[0] += key[1]
      return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
      logits = self.model(input_ids=self.tokens).logits
      loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                               self.targets.reshape(-1))
    loss.backward()
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)
    weights = nbytes(list(self.model.parameters()))
    grads = nbytes([p.grad for p in self.params if p.grad is not None])
    opt = nbytes([v for s in self.opt.state.values() for v in s.values() if torch.is_tensor(v)])
    self.opt.zero_grad(set_to_none=True)
    return weights + grads + opt + saved[0], 'weights + grads + optimizer + saved activations'


def run(cfg, *, steps: int = 5, rounds: int = 3, rank: int = 16, compare_hf: bool = True) -> dict:
  B, T = cfg.data.batch_size, cfg.data.seq_len
  print(f'bench finetune: {jax.device_count()} x {jax.devices()[0].device_kind}, batch {B} x {T}, '
        f'{cfg.model.n_layers} layers, d_model {cfg.model.d_model}, vocab {cfg.model.vocab_size}, '
        f'{cfg.model.compute_dtype}; LoRA r={rank} on q,k,v,o,gate,up,down')
  runs = {'lm full': LmRun(cfg), 'lm lora': LmRun(lora_variant(cfg, rank))}
  if compare_hf:
    try:
      runs['hf full'] = HfRun(cfg)
      runs['hf+peft lora'] = HfRun(cfg, lora_rank=rank)
    except ImportError:
      print('hf: skipped (install torch==2.13.0, transformers and peft to compare)')
  for r in runs.values():
    r.steps(2)  # compile / warm up
  best = {name: float('inf') for name in runs}
  for _ in range(rounds):
    for name, r in runs.items():
      best[name] = min(best[name], r.steps(steps))
  results = {}
  for name, r in runs.items():
    mem, how = r.memory()
    results[name] = {'tokens_per_s': B * T / best[name], 'step_ms': best[name] * 1e3,
                     'memory_bytes': mem, 'memory': how, 'loss': r.loss}
    print(f'{name:13s} {B * T / best[name]:10,.0f} tokens/s  {best[name] * 1e3:8.1f} ms/step  '
          f'{mem / 2**20:8,.1f} MiB ({how})  {r.summary}')
  ratio = lambda a, b, key: results[a][key] / results[b][key]
  print(f'lm lora / lm full step time: {ratio("lm lora", "lm full", "step_ms"):.2f}x (target <= 0.75)'
        f'; memory {ratio("lm lora", "lm full", "memory_bytes"):.2f}x')
  if 'hf full' in results:
    print(f'lm / hf full fine-tuning:    {ratio("lm full", "hf full", "tokens_per_s"):.2f}x tokens/s '
          f'(target >= 1), memory {ratio("lm full", "hf full", "memory_bytes"):.2f}x')
    print(f'lm / hf+peft lora:           {ratio("lm lora", "hf+peft lora", "tokens_per_s"):.2f}x '
          f'tokens/s (target >= 1.3), memory {ratio("lm lora", "hf+peft lora", "memory_bytes"):.2f}x')
  return results


def main(argv=None) -> int:
  """python -m lm.bench.finetune [--config configs/bench_tiny.py] [--steps N] [--rank R] [--no-hf]"""
  from lm import config as config_lib  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(prog='lm bench finetune', allow_abbrev=False)
  parser.add_argument('--config', default='configs/bench_tiny.py')
  parser.add_argument('--steps', type=int, default=5, help='steps per round')
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--rank', type=int, default=16)
  parser.add_argument('--no-hf', action='store_true')
  args, overrides = parser.parse_known_args(argv)
  cfg = config_lib.load_config(args.config, overrides)
  run(cfg, steps=args.steps, rounds=args.rounds, rank=args.rank, compare_hf=not args.no_hf)
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
