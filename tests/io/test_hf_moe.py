"""Mixtral and Qwen3-MoE in and out of Hugging Face: logits, greedy decoding, router loss, export
bit for bit, and a PEFT adapter, each against transformers itself (CPU torch, fp32)."""

import json

import jax
import numpy as np
import pytest
import safetensors.numpy
from conftest import tiny_config
from hf_util import TOKENS, hf_logits, random_hf_model

from lm import sharding as sharding_lib
from lm.errors import CheckpointError
from lm.eval import generate as gen
from lm.io import hf
from lm.io.safetensors import Reader
from lm.io import peft as peft_io
from lm.model import lora
from lm.train.state import ModelSpec

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              num_experts_per_tok=2)
FAMILIES = {
    'mixtral': ('MixtralConfig', dict(num_local_experts=4, sliding_window=None)),
    'qwen3_moe': ('Qwen3MoeConfig', dict(num_experts=4, moe_intermediate_size=16, head_dim=8,
                                         norm_topk_prob=False)),
    'qwen3_moe_norm': ('Qwen3MoeConfig', dict(num_experts=4, moe_intermediate_size=16, head_dim=8,
                                              norm_topk_prob=True, tie_word_embeddings=True)),
    # A dense layer between two MoE ones: one stack of each, the layer scan in three segments.
    'qwen3_moe_sparse': ('Qwen3MoeConfig', dict(num_experts=4, moe_intermediate_size=16, head_dim=8,
                                                num_hidden_layers=3, mlp_only_layers=[1])),
}


def make_hf_model(family, path, **save):
  """A tiny random HF MoE model; router weights large enough that the top-k choice is decisive."""
  cls, extra = FAMILIES[family]

  def init(name):
    std = 0.3 if name.endswith('norm.weight') else (1.0 if name.endswith('gate.weight') else 0.2)
    return (1.0 if name.endswith('norm.weight') else 0.0), std

  return random_hf_model(cls, {**COMMON, **extra}, path, init, **save)


def lm_model(path, mesh_shape=None):
  c = tiny_config()
  c.model.update(hf.model_config_from_hf(hf.read_config(path)))
  if mesh_shape:
    c.mesh.shape.update(mesh_shape)
  spec = ModelSpec(c.model)
  mesh = sharding_lib.make_mesh(c.mesh, None if mesh_shape else jax.devices()[:1])
  shardings = sharding_lib.param_shardings(spec.logical_axes, spec.shapes, mesh, c.mesh.rules)
  return c, spec, hf.load_params(str(path), spec, shardings)


def tensors(path):
  out = {}
  for file in sorted(path.glob('*.safetensors')):
    reader = Reader(str(file))
    out.update({n: np.array(reader.get(n)) for n in reader.names()})
  return out


def _greedy_export_and_reload_agree(spec, params, c, hf_model, reference, tmp_path) -> dict:
  """Greedy decoding with lm's KV cache picks the tokens transformers' generate picks; the export
  holds transformers' very tensors (a tied lm_head aside) and reloads to the same logits. Returns
  the exported config.json."""
  prompt = TOKENS[:, :6]
  fn = jax.jit(gen.make_generate_fn(spec, gen.Sampling(max_new_tokens=8), eos_id=-1, pad_id=0))
  out, _ = fn(params, prompt, np.full((2,), 6, np.int32), jax.random.key(0))
  with torch.no_grad():
    expected = hf_model.generate(torch.from_numpy(prompt.astype(np.int64)), max_new_tokens=8,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)
  assert np.asarray(out).tolist() == expected[:, 6:].numpy().tolist()

  hf.save(str(tmp_path / 'out'), params, c.model, max_shard_bytes=30_000)
  original, exported = tensors(tmp_path / 'hf'), tensors(tmp_path / 'out')
  if c.model.tie_embeddings:
    original.pop('lm_head.weight', None)
  assert sorted(exported) == sorted(original)
  for name, value in original.items():
    assert exported[name].tobytes() == value.tobytes(), name
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'out').float().eval()
  np.testing.assert_array_equal(hf_logits(reloaded), reference)
  return json.loads((tmp_path / 'out' / 'config.json').read_text())


@pytest.mark.parametrize('family', list(FAMILIES))
def test_import_matches_transformers_and_export_is_bit_identical(family, tmp_path):
  hf_model = make_hf_model(family, tmp_path / 'hf', max_shard_size='40KB')
  reference = hf_logits(hf_model)
  c, spec, params = lm_model(tmp_path / 'hf', dict(data=1, fsdp=2, tensor=1, expert=4))
  assert c.model.moe.n_experts == 4 and c.model.qk_norm == family.startswith('qwen3')
  gate = params['layers.moe.gate.kernel']  # [L, E, D, F]: each device holds one expert
  assert gate.addressable_shards[0].data.shape[1] == 1
  ours = np.asarray(jax.jit(lambda p: spec.bind(p)(TOKENS))(params))
  assert np.max(np.abs(ours - reference)) <= 1e-4
  assert np.std(reference) > 0.5

  config = _greedy_export_and_reload_agree(spec, params, c, hf_model, reference, tmp_path)
  assert config['model_type'] == family.removesuffix('_norm').removesuffix('_sparse')


def test_load_balancing_loss_is_transformers_aux_loss(tmp_path):
  hf_model = make_hf_model('mixtral', tmp_path)
  mask = np.ones_like(TOKENS)
  mask[1, 11:] = 0  # padding is left out of the statistics on both sides
  with torch.no_grad():
    out = hf_model(torch.from_numpy(TOKENS.astype(np.int64)), output_router_logits=True,
                   attention_mask=torch.from_numpy(mask.astype(np.int64)))
  _, spec, params = lm_model(tmp_path)
  model = spec.bind(params)
  model(TOKENS, segment_ids_BT=mask.astype(np.int32))
  np.testing.assert_allclose(float(model.router_losses['load_balancing']), float(out.aux_loss),
                             rtol=1e-5)


def test_peft_adapter_round_trip_on_a_moe_model(tmp_path):
  peft = pytest.importorskip('peft')
  base_hf = make_hf_model('qwen3_moe', tmp_path / 'base')
  c = tiny_config()
  c.model.update(hf.model_config_from_hf(hf.read_config(tmp_path / 'base')))
  c.model.lora.update(rank=4, alpha=8.0, targets=r'attn\.(q|k|v|o)$')
  spec = ModelSpec(c.model)
  shardings = {n: jax.sharding.SingleDeviceSharding(jax.devices()[0]) for n in spec.names}
  base = hf.load_params(str(tmp_path / 'base'), ModelSpec(lora.without_adapters(c.model)), shardings)
  params = {**spec.init(jax.random.key(0)), **base}
  rng = np.random.default_rng(0)
  params.update({n: 0.1 * rng.standard_normal(v.shape).astype(np.float32)
                 for n, v in params.items() if n.endswith('lora_b')})
  ours = np.asarray(jax.jit(lambda p: spec.bind(p)(TOKENS))(params))
  assert np.max(np.abs(ours - hf_logits(base_hf))) > 1e-2  # the adapter changes the function

  peft_io.save_peft(str(tmp_path / 'adapter'), params, c.model)
  peft_model = peft.PeftModel.from_pretrained(base_hf, str(tmp_path / 'adapter')).eval()
  assert np.max(np.abs(hf_logits(peft_model) - ours)) <= 1e-4
  back = peft_io.load_peft(str(tmp_path / 'adapter'), spec)
  for name, value in back.items():
    np.testing.assert_array_equal(np.asarray(value), np.asarray(params[name]))



@pytest.mark.parametrize('targets', [r'layers\.(attn|moe)\.', r'layers\.moe\.(up|down)$'])
def test_peft_export_of_expert_adapters_loads_in_peft_and_agrees(targets, tmp_path):
  """LoRA on every expert's gate/up/down (and attention) as PEFT target_parameters: PeftModel
  on transformers' fused experts computes what lm computes."""
  peft = pytest.importorskip('peft')
  base_hf = make_hf_model('qwen3_moe', tmp_path / 'base')
  c = tiny_config()
  c.model.update(hf.model_config_from_hf(hf.read_config(tmp_path / 'base')))
  c.model.lora.update(rank=2, alpha=6.0, targets=targets)
  spec = ModelSpec(c.model)
  shardings = {n: jax.sharding.SingleDeviceSharding(jax.devices()[0]) for n in spec.names}
  base = hf.load_params(str(tmp_path / 'base'), ModelSpec(lora.without_adapters(c.model)), shardings)
  params = {**spec.init(jax.random.key(0)), **base}
  rng = np.random.default_rng(0)
  params.update({n: 0.3 * rng.standard_normal(v.shape).astype(np.float32)
                 for n, v in params.items() if n.endswith('lora_b')})
  assert params['layers.moe.down.lora_b'].shape == (2, 4, 2, 32)  # [L, E, r, D]
  ours = np.asarray(jax.jit(lambda p: spec.bind(p)(TOKENS))(params))
  assert np.max(np.abs(ours - hf_logits(base_hf))) > 1e-2  # the adapters change the function

  peft_io.save_peft(str(tmp_path / 'adapter'), params, c.model)
  config = json.loads((tmp_path / 'adapter' / 'adapter_config.json').read_text())
  assert set(config['target_parameters']) == {'mlp.experts.gate_up_proj', 'mlp.experts.down_proj'}
  peft_model = peft.PeftModel.from_pretrained(base_hf, str(tmp_path / 'adapter')).eval()
  error = float(np.max(np.abs(hf_logits(peft_model) - ours)))
  print(f'PEFT expert adapters ({targets}): max |dlogit| {error:.2e}')
  assert error <= 1e-4
  # Read back: gate_up_proj's rank-2r adapter becomes lm's gate and up sharing its A, the rank-r
  # ones are padded to 2r, and the function stays.
  back = _import_peft(tmp_path / 'base', tmp_path / 'adapter')
  assert back.cfg.lora.rank == 4
  assert float(np.max(np.abs(back.logits - ours))) <= 1e-5


class _Imported:
  def __init__(self, cfg, logits):
    self.cfg, self.logits = cfg, logits


def _import_peft(base_dir, adapter_dir):
  """lm's model config and logits for the HF base at `base_dir` with the PEFT adapter."""
  c = tiny_config()
  c.model.update(hf.model_config_from_hf(hf.read_config(base_dir)))
  c.model.lora.update(peft_io.lora_config_from_peft(peft_io.read_peft_config(str(adapter_dir))))
  spec = ModelSpec(c.model)
  shardings = {n: jax.sharding.SingleDeviceSharding(jax.devices()[0]) for n in spec.names}
  params = {**hf.load_params(str(base_dir), ModelSpec(lora.without_adapters(c.model)), shardings),
            **peft_io.load_peft(str(adapter_dir), spec)}
  return _Imported(spec.cfg, np.asarray(jax.jit(lambda p: spec.bind(p)(TOKENS))(params)))


def test_expert_adapters_made_by_peft_import_into_lm(tmp_path):
  """An adapter PEFT itself made (random A and B, a larger rank and its own alpha on the
  experts' down_proj, rsLoRA) reads into lm with PeftModel's logits."""
  peft = pytest.importorskip('peft')
  base_hf = make_hf_model('qwen3_moe', tmp_path / 'base')
  config = peft.LoraConfig(r=2, lora_alpha=4, use_rslora=True, target_modules=['q_proj', 'v_proj'],
                           target_parameters=['mlp.experts.gate_up_proj', 'mlp.experts.down_proj'],
                           rank_pattern={'mlp.experts.down_proj': 3},
                           alpha_pattern={'mlp.experts.down_proj': 5}, init_lora_weights=False)
  model = peft.get_peft_model(base_hf, config).eval()
  model.save_pretrained(tmp_path / 'adapter')
  expected = hf_logits(model)
  # PEFT applied the pattern: down_proj's A holds rank 3 per expert (4 experts), gate_up's rank 2.
  saved = safetensors.numpy.load_file(tmp_path / 'adapter' / 'adapter_model.safetensors')
  assert saved['base_model.model.model.layers.0.mlp.experts.lora_A.weight'].shape == (12, 16)
  assert saved['base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight'].shape == (8, 32)
  back = _import_peft(tmp_path / 'base', tmp_path / 'adapter')
  assert back.cfg.lora.rank == 3
  error = float(np.max(np.abs(back.logits - expected)))
  print(f'PEFT-made expert adapters in lm: max |dlogit| {error:.2e}')
  assert error <= 1e-4


def test_unsupported_moe_variants_are_refused_in_one_line(tmp_path):
  make_hf_model('qwen3_moe', tmp_path)
  config = hf.read_config(tmp_path)
  assert hf.model_config_from_hf({**config, 'decoder_sparse_step': 2})['mlp_types'] == (
      'dense', 'moe')  # layer i has experts when (i + 1) % step == 0, as in transformers
  with pytest.raises(CheckpointError, match='attention_bias=true is not supported'):
    hf.model_config_from_hf({**config, 'attention_bias': True})
  c = tiny_config(qk_norm=False)
  c.model.moe.update(n_experts=4, norm_topk_prob=False)
  with pytest.raises(CheckpointError, match='Mixtral, which always sets'):
    hf.family_of(c.model)


def test_init_from_sets_the_expert_architecture_and_keeps_the_run_settings(tmp_path):
  from lm.io import pretrained
  make_hf_model('qwen3_moe', tmp_path)
  c = tiny_config()
  c.model.moe.update(aux_loss_weight=0.5, implementation='dense')
  c.train.init_from = str(tmp_path)
  pretrained.resolve_config(c)
  assert (c.model.moe.n_experts, c.model.moe.experts_per_token, c.model.moe.expert_dim) == (4, 2, 16)
  assert c.model.qk_norm and not c.model.moe.norm_topk_prob
  assert (c.model.moe.aux_loss_weight, c.model.moe.implementation) == (0.5, 'dense')


GLM = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
           moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=2,
           n_group=4, topk_group=2, first_k_dense_replace=1, attention_bias=True, use_qk_norm=True,
           routed_scaling_factor=2.5)


def test_glm4_moe_dense_then_moe_layers_match_transformers_and_export_bit_identical(tmp_path):
  """GLM-4.5: a dense first layer, then MoE layers with the biased sigmoid, group-limited router
  and shared experts; partial RoPE and q/k/v biases in attention."""
  def init(name):
    if name.endswith('norm.weight'):
      return 1.0, 0.3
    return 0.0, (1.0 if name.endswith('gate.weight') else 0.2)

  hf_model = random_hf_model('Glm4MoeConfig', GLM, tmp_path / 'hf', init)
  rng = torch.Generator().manual_seed(2)
  with torch.no_grad():  # a correction bias large enough to change the choice (a buffer: not init'd)
    for layer in hf_model.model.layers[1:]:
      layer.mlp.gate.e_score_correction_bias.copy_(0.5 * torch.randn(8, generator=rng))
  hf_model.save_pretrained(tmp_path / 'hf')
  reference = hf_logits(hf_model)
  c, spec, params = lm_model(tmp_path / 'hf')
  assert tuple(c.model.mlp_types) == ('dense', 'moe', 'moe') and c.model.moe.router == 'sigmoid'
  assert c.model.partial_rotary_factor == 0.5 and c.model.moe.shared_dim == 32
  ours = np.asarray(jax.jit(lambda p: spec.bind(p)(TOKENS))(params))
  error = float(np.max(np.abs(ours - reference)))
  print(f'glm4_moe: max |dlogit| {error:.2e} (logit std {np.std(reference):.2f})')
  assert error <= 1e-4 and np.std(reference) > 0.5

  _greedy_export_and_reload_agree(spec, params, c, hf_model, reference, tmp_path)
