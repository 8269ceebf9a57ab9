"""DeepSeek-V3 (lm/io/families/deepseek_v3.py) against transformers 5.25's DeepseekV3ForCausalLM,
built tiny (dense, and a dense layer then a Mixture-of-Experts one): the same fp32 logits, the same greedy tokens through lm's
latent-cache generator, export of the very tensors transformers saved, and LoRA adapters on the
MLA projections that PEFT loads onto the transformers model."""

import json

import jax
import numpy as np
import pytest
from conftest import tiny_config

from lm.eval import generate as generate_lib
from lm.errors import CheckpointError
from lm.io import hf, peft as peft_io
from lm.io.safetensors import Reader
from lm.train.state import ModelSpec

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

# Values narrower than queries/keys (12 vs 8 + 8) and a latent narrower than the heads' K/V, as
# in DeepSeek-V3; first_k_dense_replace = num_hidden_layers: every layer dense.
COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
              kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=8,
              v_head_dim=12, first_k_dense_replace=2, pad_token_id=0, bos_token_id=1,
              eos_token_id=2)
VARIANTS = {
    # transformers' defaults: low-rank q, interleaved RoPE pairs.
    'low_rank_q': {},
    # Direct q; YaRN with DeepSeek's mscale pair (cos/sin factor and the softmax scale differ).
    'direct_q_yarn': dict(q_lora_rank=None, rope_parameters=dict(
        rope_type='yarn', rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16,
        mscale=1.0, mscale_all_dim=0.8)),
    'halves_bias': dict(rope_interleave=False, attention_bias=True),
    # A dense first layer, then MoE: sigmoid router with its correction bias, top-1 of 2 groups,
    # routed scaling, a shared expert (lm/model/routers.py, glm4_moe's MoE table).
    'moe': dict(first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2,
                moe_intermediate_size=16, n_shared_experts=1, n_group=2, topk_group=1,
                routed_scaling_factor=2.5, norm_topk_prob=True),
}
TOKENS = np.random.default_rng(0).integers(3, 128, (2, 16)).astype(np.int32)


def make_hf_model(path, **extra):
  """A tiny random DeepSeek-V3 saved by transformers; norms and biases random too."""
  config = transformers.DeepseekV3Config(**{**COMMON, **extra})
  config._attn_implementation = 'eager'  # pylint: disable=protected-access
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      is_norm = name.endswith('norm.weight')
      std = 0.3 if is_norm or name.endswith('.bias') else 0.2
      p.copy_((1.0 if is_norm else 0.0) + std * torch.randn(p.shape, generator=gen))
  model.save_pretrained(path)
  return model


def lm_import(path, **model):
  c = tiny_config(**model)
  c.model.update(hf.model_config_from_hf(hf.read_config(path)))
  spec = ModelSpec(c.model)
  shardings = {n: jax.sharding.SingleDeviceSharding(jax.devices()[0]) for n in spec.names}
  return c, spec, hf.load_params(str(path), spec, shardings)


def logits_of(model, tokens):
  with torch.no_grad():
    return model(torch.from_numpy(tokens.astype(np.int64))).logits.float().numpy()


def tensors(path):
  reader = Reader(str(path))
  return {n: np.array(reader.get(n)) for n in reader.names()}


@pytest.mark.parametrize('variant', list(VARIANTS))
def test_deepseek_v3_matches_transformers(variant, tmp_path):
  model = make_hf_model(tmp_path / 'hf', **VARIANTS[variant])
  reference = logits_of(model, TOKENS)
  c, spec, params = lm_import(tmp_path / 'hf')
  assert c.model.mla.kv_lora_rank == 16 and 'layers.attn.kv_b.kernel' in params
  ours = np.asarray(jax.jit(lambda p: spec.bind(p)(TOKENS))(params))
  error = float(np.max(np.abs(ours - reference)))
  print(f'deepseek_v3 {variant}: max |dlogit| {error:.2e} (logit std {np.std(reference):.2f})')
  assert error <= 1e-4 and np.std(reference) > 0.3

  # Greedy decoding through lm's cache of latents against transformers' generate.
  prompt, N = TOKENS[:1, :6], 12
  model.generation_config.eos_token_id = None
  with torch.no_grad():
    expected = model.generate(torch.from_numpy(prompt.astype(np.int64)), max_new_tokens=N,
                              do_sample=False, pad_token_id=0)[0, 6:].numpy()
  fn = generate_lib.make_generate_fn(spec, generate_lib.Sampling(max_new_tokens=N), eos_id=-1,
                                     pad_id=0)
  out, _ = jax.jit(fn)(params, prompt, np.asarray([6], np.int32), jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(out)[0], expected)

  # Export writes back exactly the tensors transformers saved, and transformers reloads it.
  hf.save(str(tmp_path / 'out'), params, c.model)
  original, exported = tensors(tmp_path / 'hf' / 'model.safetensors'), tensors(
      tmp_path / 'out' / 'model.safetensors')
  assert sorted(exported) == sorted(original)
  for name, value in original.items():
    np.testing.assert_array_equal(exported[name], value, err_msg=name)
  config = json.loads((tmp_path / 'out' / 'config.json').read_text())
  assert config['architectures'] == ['DeepseekV3ForCausalLM']
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'out').float().eval()
  assert np.max(np.abs(logits_of(reloaded, TOKENS) - reference)) <= 1e-5


def test_runs_started_from_deepseek_keep_mla_and_interleaved_rope(tmp_path):
  """train.init_from a DeepSeek directory, then from an lm run of it: both carry model.mla and
  the RoPE layout, without which the weights would compute another function."""
  from lm.io import pretrained  # pylint: disable=import-outside-toplevel
  make_hf_model(tmp_path / 'hf')
  first = tiny_config()
  first.train.init_from = str(tmp_path / 'hf')
  pretrained.resolve_config(first)
  assert first.model.mla.kv_lora_rank == 16 and first.model.rope_interleaved
  (tmp_path / 'run' / 'checkpoints').mkdir(parents=True)
  (tmp_path / 'run' / 'config.json').write_text(first.to_json_best_effort())
  second = tiny_config()
  second.train.init_from = str(tmp_path / 'run')
  pretrained.resolve_config(second)
  assert second.model.mla.to_dict() == first.model.mla.to_dict()
  assert second.model.rope_interleaved and second.model.hf_family == 'deepseek_v3'


def test_lora_adapters_on_mla_load_in_peft(tmp_path):
  """LoRA on every MLA projection, exported as PEFT files, loads with peft.PeftModel onto the
  transformers model and gives lm's logits; lm reads the directory back to the same adapters."""
  peft = pytest.importorskip('peft')
  model = make_hf_model(tmp_path / 'hf')
  lora = dict(rank=4, alpha=8.0, targets=r'layers\.attn\.')
  c, spec, params = lm_import(tmp_path / 'hf', lora=lora)
  adapted = {n for n in spec.names if n.endswith(('lora_a', 'lora_b'))}
  assert {n.rsplit('.', 2)[1] for n in adapted} == {'q_a', 'q_b', 'kv_a', 'kv_b', 'o'}
  # Base weights imported; adapters as initialised, with B random so they matter.
  fresh = spec.init(jax.random.key(0))
  keys = iter(jax.random.split(jax.random.key(1), len(fresh)))
  params = {n: params.get(n, 0.1 * jax.random.normal(next(keys), v.shape) if n.endswith('lora_b')
                          else v) for n, v in fresh.items()}
  peft_io.save_peft(str(tmp_path / 'adapter'), params, c.model)
  adapter_config = json.loads((tmp_path / 'adapter' / 'adapter_config.json').read_text())
  assert sorted(adapter_config['target_modules']) == [
      'kv_a_proj_with_mqa', 'kv_b_proj', 'o_proj', 'q_a_proj', 'q_b_proj']
  peft_model = peft.PeftModel.from_pretrained(model, str(tmp_path / 'adapter')).eval()
  got = logits_of(peft_model, TOKENS)
  expected = np.asarray(jax.jit(lambda p: spec.bind(p)(TOKENS))(params))
  with peft_model.disable_adapter():
    base = logits_of(peft_model, TOKENS)
  assert np.max(np.abs(base - expected)) > 0.1  # the adapters matter
  error = float(np.max(np.abs(got - expected)))
  print(f'deepseek_v3 PEFT: max |dlogit| {error:.2e}')
  assert error <= 1e-4
  c.model.lora.update(peft_io.lora_config_from_peft(
      peft_io.read_peft_config(str(tmp_path / 'adapter'))))
  loaded = peft_io.load_peft(str(tmp_path / 'adapter'), ModelSpec(c.model))
  assert set(loaded) == adapted
  for name in adapted:
    np.testing.assert_array_equal(np.asarray(loaded[name]), np.asarray(params[name]), err_msg=name)


def test_peft_export_of_dense_mlp_adapters_is_refused(tmp_path):
  """PEFT loads DeepSeek's gate/up/down_proj adapters as experts' weights, dropping them: one line
  instead of adapters that silently do nothing."""
  config = hf.model_config_from_hf({**COMMON, 'model_type': 'deepseek_v3',
                                    'architectures': ['DeepseekV3ForCausalLM']})
  c = tiny_config(lora=dict(rank=2, targets=r'layers\.(attn|mlp)\.'))
  c.model.update(config)
  spec = ModelSpec(c.model)
  params = {n: np.zeros(s.shape, s.dtype) for n, s in spec.shapes.items()}
  with pytest.raises(CheckpointError, match=r'^PEFT export of LoRA on layers\.mlp\.\w+ is not '
                                            r'supported for deepseek_v3: PEFT loads'):
    peft_io.save_peft(str(tmp_path / 'adapter'), params, c.model)
