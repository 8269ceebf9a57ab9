"""The one benchmark harness: a random batch, lm's train step and its HF/torch peer behind one
interface, alternating timing rounds, and memory accounting.

Every benchmark that times a train step (`lm bench`, `lm bench finetune`, `lm bench data`) builds
`LmStep`s and, where torch and transformers are installed, `HfStep`s of the same shape, and times
them with `time_rounds`: steps alternate between the runs in rounds and each run's best round
counts, so a machine shared with other work slows all of them alike.

Memory: on a GPU, each framework's allocator peak. On CPU there is no allocator peak to read, so
both sides report the same account of the step: lm, the buffers of the compiled step (arguments +
temporaries + outputs not aliased to inputs, from XLA's memory analysis); HF, weights + optimizer
state + gradients + the tensors autograd saved for the backward pass.
"""

from __future__ import annotations

import statistics
import time

import jax
import numpy as np

from lm.train.loop import Trainer

# LoRA on every linear layer of the blocks, on both sides.
LORA_TARGETS = r'layers\.(attn|mlp)\.'
HF_LORA_TARGETS = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']


def random_batch(cfg, seed: int = 0) -> dict:
  """A training batch of the config's shape: random tokens, every target weighted, one segment."""
  rng = np.random.default_rng(seed)
  B, T, V = cfg.data.batch_size, cfg.data.seq_len, cfg.model.vocab_size
  tokens = rng.integers(0, V, (B, T + 1), dtype=np.int32)
  return {'tokens': tokens[:, :-1], 'targets': tokens[:, 1:], 'weights': np.ones((B, T), np.float32),
          'segment_ids': np.ones((B, T), np.int32),
          'positions': np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()}


def compiled_bytes(memory_analysis) -> int:
  """Bytes a compiled XLA program holds at once: arguments + temporaries + outputs not aliased."""
  m = memory_analysis
  return (m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes
          - m.alias_size_in_bytes)


def time_compiled_step(cfg, steps: int) -> tuple[float, float]:
  """(median seconds of `steps` train steps on one device after two settling ones, the compiled
  step's temporaries in MiB). The step runs as compiled for its memory figure: one compile."""
  trainer = Trainer(cfg, devices=jax.devices()[:1])
  box = [trainer.init_state()]
  batch = trainer.global_batch(random_batch(cfg))
  compiled = trainer.step.lower(box[0], batch).compile()

  def step():
    with jax.set_mesh(trainer.mesh):
      box[0], metrics = compiled(box[0], batch)
    jax.block_until_ready(metrics)
  for _ in range(2):
    step()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return statistics.median(times), compiled.memory_analysis().temp_size_in_bytes / 2 ** 20


class LmStep:
  """lm's train step for `cfg` on a random batch."""

  def __init__(self, cfg, *, devices=None):
    self.cfg = cfg
    self.trainer = Trainer(cfg, devices=devices)
    self.state = self.trainer.init_state()
    self.batch = self.trainer.global_batch(random_batch(cfg))
    self.summary = self.trainer.trainable_summary()
    self.loss = float('nan')

  def steps(self, n: int) -> float:
    """Seconds per step over `n` steps."""
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
    compiled = self.trainer.step.lower(self.state, self.batch).compile()
    return compiled_bytes(compiled.memory_analysis()), 'compiled step buffers'


def hf_available() -> bool:
  try:
    import torch  # pylint: disable=import-outside-toplevel,unused-import
    import transformers  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return False
  del torch, transformers  # imported only to see that they exist
  return True


class HfStep:
  """The same shape as a transformers LlamaForCausalLM (+ PEFT LoRA when `lora_rank`) trained with
  torch AdamW and global-norm clipping: the peer lm is compared with."""

  def __init__(self, cfg, lora_rank: int = 0):
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel
    self.torch = torch
    m = cfg.model
    hf_cfg = transformers.LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.mlp_dim,
        num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads,
        num_key_value_heads=m.n_kv_heads, max_position_embeddings=max(m.max_seq_len, cfg.data.seq_len),
        rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta, tie_word_embeddings=m.tie_embeddings,
        attention_bias=m.qkv_bias)
    self.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_cfg).to(self.device)
    if lora_rank:
      import peft  # pylint: disable=import-outside-toplevel
      model = peft.get_peft_model(model, peft.LoraConfig(
          r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0, target_modules=HF_LORA_TARGETS))
    model.train()
    self.model = model
    self.params = [p for p in model.parameters() if p.requires_grad]
    o = cfg.optimizer
    self.opt = torch.optim.AdamW(self.params, lr=o.lr, betas=(o.b1, o.b2), eps=o.eps,
                                 weight_decay=o.weight_decay)
    self.clip = o.grad_clip or 1e9
    batch = random_batch(cfg)
    self.tokens = torch.from_numpy(batch['tokens'].astype(np.int64)).to(self.device)
    self.targets = torch.from_numpy(batch['targets'].astype(np.int64)).to(self.device)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in self.params)
    self.summary = f'{trainable:,} of {total:,} parameters trainable ({100 * trainable / total:.2f}%)'
    self.versions = (f'transformers {transformers.__version__}, torch {torch.__version__}, '
                     f'{torch.get_num_threads()} threads')
    self.loss = float('nan')

  def _loss(self):
    logits = self.model(input_ids=self.tokens).logits
    return self.torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                  self.targets.reshape(-1))

  def steps(self, n: int) -> float:
    torch = self.torch
    start = time.perf_counter()
    for _ in range(n):
      loss = self._loss()
      loss.backward()
      torch.nn.utils.clip_grad_norm_(self.params, self.clip)
      self.opt.step()
      self.opt.zero_grad(set_to_none=True)
    self.loss = float(loss.detach())
    if self.device == 'cuda':
      torch.cuda.synchronize()
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
      loss = self._loss()
    loss.backward()
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)
    weights = nbytes(list(self.model.parameters()))
    grads = nbytes([p.grad for p in self.params if p.grad is not None])
    opt = nbytes([v for s in self.opt.state.values() for v in s.values() if torch.is_tensor(v)])
    self.opt.zero_grad(set_to_none=True)
    return weights + grads + opt + saved[0], 'weights + grads + optimizer + saved activations'


def time_rounds(runs: dict, *, steps: int, rounds: int, warmup: int = 2) -> dict:
  """{name: best seconds per step}: `warmup` steps each (compilation), then `rounds` rounds of
  `steps` steps that alternate between the runs."""
  for r in runs.values():
    r.steps(warmup)
  best = {name: float('inf') for name in runs}
  for _ in range(rounds):
    for name, r in runs.items():
      best[name] = min(best[name], r.steps(steps))
  return best


def measure(runs: dict, tokens_per_step: int, *, steps: int, rounds: int) -> dict:
  """{name: {tokens_per_s, step_ms, memory_bytes, memory, loss, summary}} for every run."""
  best = time_rounds(runs, steps=steps, rounds=rounds)
  out = {}
  for name, r in runs.items():
    mem, how = r.memory()
    out[name] = {'tokens_per_s': tokens_per_step / best[name], 'step_ms': best[name] * 1e3,
                 'memory_bytes': mem, 'memory': how, 'loss': r.loss, 'summary': r.summary}
  return out
