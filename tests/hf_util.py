"""Tiny Hugging Face models saved by transformers, for parity tests (torch and transformers
are imported by the tests that use these)."""

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {
    'llama2': ('LlamaConfig', dict(rms_norm_eps=1e-5)),
    'llama3': ('LlamaConfig', dict(tie_word_embeddings=True, rope_theta=500000.0, rope_scaling=dict(
        rope_type='llama3', factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64))),
    'mistral': ('MistralConfig', dict(sliding_window=6)),
    'qwen2': ('Qwen2Config', dict(tie_word_embeddings=True, rope_theta=1e6)),
    'gemma': ('GemmaConfig', dict(head_dim=16, hidden_act='gelu_pytorch_tanh')),
}
TOKENS = np.random.default_rng(0).integers(0, 128, (2, 16)).astype(np.int32)


def random_hf_model(cls, config_kwargs, path, init, **save):
  """A tiny transformers model of class `cls` built from `config_kwargs`, every weight drawn as
  base + std * N(0, 1) with (base, std) = init(name), saved to `path` (save: save_pretrained's
  options)."""
  config = getattr(transformers, cls)(**config_kwargs)
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      base, std = init(name)
      p.copy_(base + std * torch.randn(p.shape, generator=gen))
  model.save_pretrained(path, **save)
  return model


def make_hf_model(family, path, **save):
  """A randomly initialised tiny HF model of `family`, every weight (norms, biases) random."""
  cls, extra = FAMILIES[family]

  def init(name):
    std = 0.3 if name.endswith(('norm.weight', '.bias')) else 0.2
    return (1.0 if name.endswith('norm.weight') and family != 'gemma' else 0.0), std

  return random_hf_model(cls, {**COMMON, **extra}, path, init, **save)


def hf_logits(model, tokens=TOKENS):
  with torch.no_grad():
    return model(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
