"""`lm bench`: tokens/s, step time, MFU and peak memory of a config's train step.

With `transformers` and `torch` installed, the same shape also trains through HF transformers in
the same process and the ratio is printed, so the comparison shares one machine and one moment.
"""

from __future__ import annotations

import resource
import time

import jax
import numpy as np

from lm.train import flops as flops_lib
from lm.train.loop import Trainer


def random_batch(cfg, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  B, T, V = cfg.data.batch_size, cfg.data.seq_len, cfg.model.vocab_size
  tokens = rng.integers(0, V, (B, T + 1), dtype=np.int32)
  return {'tokens': tokens[:, :-1], 'targets': tokens[:, 1:], 'weights': np.ones((B, T), np.float32),
          'segment_ids': np.ones((B, T), np.int32),
          'positions': np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()}


def _peak_memory(trainer, state, batch) -> str:
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return f'{stats["peak_bytes_in_use"] / 2**20:,.0f} MiB device peak'
  analysis = trainer.step.lower(state, batch).compile().memory_analysis()
  compiled = (analysis.temp_size_in_bytes + analysis.argument_size_in_bytes
              + analysis.output_size_in_bytes - analysis.alias_size_in_bytes)
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
  return f'{compiled / 2**20:,.0f} MiB step buffers (compiled), {rss:,.0f} MiB process peak RSS'


def bench_lm(cfg, steps: int = 10, warmup: int = 2) -> dict:
  trainer = Trainer(cfg)
  state = trainer.init_state()
  batch = trainer.global_batch(random_batch(cfg))
  for _ in range(warmup):  # compile, then one more to settle
    state, metrics = trainer.step(state, batch)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = trainer.step(state, batch)
  jax.block_until_ready((state, metrics))
  step_time = (time.perf_counter() - start) / steps
  tokens = cfg.data.batch_size * cfg.data.seq_len
  peak, source = flops_lib.peak_flops_per_device(cfg.metrics.peak_flops_per_device)
  tflops = flops_lib.train_flops_per_token(cfg.model, cfg.data.seq_len) * tokens / step_time
  return {'tokens_per_s': tokens / step_time, 'step_ms': step_time * 1e3,
          'tflops': tflops / 1e12, 'mfu': tflops / (peak * jax.device_count()), 'peak_source': source,
          'memory': _peak_memory(trainer, state, batch), 'loss': float(metrics['loss'])}


def bench_hf(cfg, steps: int = 10, warmup: int = 2) -> dict | None:
  """The same shape as a transformers LlamaForCausalLM trained with torch AdamW; None if absent."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  m = cfg.model
  hf_cfg = transformers.LlamaConfig(
      vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.mlp_dim,
      num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads,
      max_position_embeddings=max(m.max_seq_len, cfg.data.seq_len), rms_norm_eps=m.norm_eps,
      rope_theta=m.rope_theta, tie_word_embeddings=m.tie_embeddings, attention_bias=m.qkv_bias)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(hf_cfg)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=cfg.optimizer.lr, betas=(cfg.optimizer.b1, cfg.optimizer.b2),
                          weight_decay=cfg.optimizer.weight_decay)
  batch = random_batch(cfg)
  tokens = torch.from_numpy(batch['tokens'].astype(np.int64))
  targets = torch.from_numpy(batch['targets'].astype(np.int64))

  def step():
    logits = model(input_ids=tokens).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optimizer.grad_clip or 1e9)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  for _ in range(warmup):
    step()
  start = time.perf_counter()
  for _ in range(steps):
    loss = step()
  step_time = (time.perf_counter() - start) / steps
  n = cfg.data.batch_size * cfg.data.seq_len
  return {'tokens_per_s': n / step_time, 'step_ms': step_time * 1e3, 'loss': float(loss),
          'versions': f'transformers {transformers.__version__}, torch {torch.__version__}, '
                      f'{torch.get_num_threads()} threads'}


def run(cfg, steps: int = 10, compare_hf: bool = True) -> dict:
  B, T = cfg.data.batch_size, cfg.data.seq_len
  print(f'bench: {jax.device_count()} x {jax.devices()[0].device_kind}, batch {B} x {T} tokens, '
        f'{cfg.model.n_layers} layers, d_model {cfg.model.d_model}, {cfg.model.compute_dtype}')
  ours = bench_lm(cfg, steps)
  print(f'lm:  {ours["tokens_per_s"]:,.0f} tokens/s, {ours["step_ms"]:.1f} ms/step, '
        f'{ours["tflops"]:.3f} TFLOP/s, MFU {ours["mfu"]:.1%} (peak: {ours["peak_source"]}), '
        f'memory: {ours["memory"]}')
  result = {'lm': ours}
  if compare_hf:
    hf = bench_hf(cfg, steps)
    if hf is None:
      print('hf:  skipped (install torch==2.13.0 and transformers to compare)')
    else:
      print(f'hf:  {hf["tokens_per_s"]:,.0f} tokens/s, {hf["step_ms"]:.1f} ms/step ({hf["versions"]})')
      print(f'lm / hf throughput: {ours["tokens_per_s"] / hf["tokens_per_s"]:.2f}x')
      result['hf'] = hf
  return result
