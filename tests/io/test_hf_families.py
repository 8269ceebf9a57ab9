"""Parity with transformers per family: Qwen3, Gemma 2, Gemma 3 (text), Phi-3 and Llama with
attention/MLP biases, with linear and YaRN RoPE, and again Llama 3, Mistral, Qwen2 and Gemma
(tests/io/test_hf.py checks those on a sharded mesh). Each tiny model is made and saved by transformers itself, with every weight random; lm
imports it and must give the same fp32 logits, the same greedy tokens through its KV-cache
generator, and export the very tensors it read."""

import json

import jax
import numpy as np
import pytest
from conftest import tiny_config

from lm import config as config_lib
from lm.eval import generate as generate_lib
from lm.errors import CheckpointError, ConfigError
from lm.io import hf
from lm.io.safetensors import Reader
from lm.train.state import ModelSpec

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
YARN = dict(rope_type='yarn', rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16)
FAMILIES = {
    # head_dim 32 with hidden 64 and 4 heads: head_dim decoupled from d_model / n_heads.
    'qwen3': ('Qwen3Config', dict(head_dim=32, tie_word_embeddings=True, rope_parameters=YARN)),
    'gemma2': ('Gemma2Config', dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=4,
                                    attn_logit_softcapping=2.0, final_logit_softcapping=3.0)),
    'gemma3': ('Gemma3TextConfig', dict(
        head_dim=16, query_pre_attn_scalar=16, sliding_window=4, final_logit_softcapping=3.0,
        layer_types=['sliding_attention', 'full_attention'],
        rope_parameters={'full_attention': dict(rope_type='linear', factor=4.0, rope_theta=1e6),
                         'sliding_attention': dict(rope_type='default', rope_theta=1e4)})),
    'phi3': ('Phi3Config', dict(sliding_window=6)),
    'llama_bias': ('LlamaConfig', dict(attention_bias=True, mlp_bias=True, rope_parameters=dict(
        rope_type='linear', rope_theta=10000.0, factor=2.0))),
    # The families tests/io/test_hf.py covers on a mesh, here for greedy decoding and exact export.
    'llama3': ('LlamaConfig', dict(tie_word_embeddings=True, rope_parameters=dict(
        rope_type='llama3', rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
        high_freq_factor=4.0, original_max_position_embeddings=16))),
    'mistral': ('MistralConfig', dict(sliding_window=4)),
    'qwen2': ('Qwen2Config', dict(tie_word_embeddings=True, rope_theta=1e6)),
    'gemma': ('GemmaConfig', dict(head_dim=32)),
    # Families built from other parts (lm/io/families/): NoPE layers; norms after each part
    # only, q/k norms over all heads, sliding and full layers each with their own RoPE.
    'smollm3': ('SmolLM3Config', dict(no_rope_layer_interval=2, attention_bias=True)),
    'olmo2': ('Olmo2Config', dict(rope_parameters=dict(rope_type='linear', rope_theta=1e4,
                                                       factor=2.0))),
    'olmo3': ('Olmo3Config', dict(sliding_window=4, layer_types=['sliding_attention',
                                                                 'full_attention'])),
    # Interleaved RoPE, chunked attention (chunk 4) with L2 q/k norms on RoPE layers, NoPE
    # layers with query temperature (floor_scale 4 so it varies within 16 tokens).
    'llama4': ('Llama4TextConfig', dict(head_dim=16, intermediate_size_mlp=80, moe_layers=[],
                                        num_local_experts=1, no_rope_layer_interval=2,
                                        attention_chunk_size=4, floor_scale=4, attn_scale=0.5)),
    # As above with a Mixture-of-Experts second layer: top-1 of 4 experts by sigmoid score, the
    # score scaling the expert's input, a shared expert; experts fused in gate_up_proj.
    'llama4_moe': ('Llama4TextConfig', dict(head_dim=16, intermediate_size_mlp=80, moe_layers=[1],
                                            num_local_experts=4, intermediate_size=24,
                                            no_rope_layer_interval=2, attention_chunk_size=4,
                                            floor_scale=4, attn_scale=0.5)),
    # Hybrid: gated DeltaNet layers and gated full attention with partial RoPE, 3 : 1 twice
    # (one scanned group of 4), DeltaNet with 2 key heads and 4 value heads.
    'qwen3_5': ('Qwen3_5TextConfig', dict(
        num_hidden_layers=8, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=8, linear_value_head_dim=8,
        rope_parameters=dict(rope_type='default', rope_theta=1e4, partial_rotary_factor=0.5))),
    # Qwen3.5's hybrid stack with MoE layers: softmax top-2 of 4 experts and a sigmoid-gated
    # shared expert; DeltaNet projections fused per key-head group (in_proj_qkvz, in_proj_ba).
    'qwen3_next': ('Qwen3NextConfig', dict(
        num_hidden_layers=4, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=8, linear_value_head_dim=8, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=16, shared_expert_intermediate_size=24,
        rope_parameters=dict(rope_type='default', rope_theta=1e4, partial_rotary_factor=0.5))),
    # Qwen3.5's stack (DeltaNet projections one per tensor) with Qwen3-Next's experts and gated
    # shared expert in every layer.
    'qwen3_5_moe': ('Qwen3_5MoeTextConfig', dict(
        num_hidden_layers=4, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=8, linear_value_head_dim=8, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=16, shared_expert_intermediate_size=24,
        rope_parameters=dict(rope_type='default', rope_theta=1e4, partial_rotary_factor=0.5))),
    # Sinks, alternating sliding (4) and full layers, YaRN; top-2 of 4 biased experts with the
    # clamped SwiGLU (limit 1.0, so the clamps bite at these scales).
    'gpt_oss': ('GptOssConfig', dict(
        head_dim=16, num_local_experts=4, num_experts_per_tok=2, intermediate_size=24,
        sliding_window=4, swiglu_limit=1.0,
        rope_parameters=dict(rope_type='yarn', rope_theta=1e4, factor=4.0, beta_fast=32.0,
                             beta_slow=1.0, truncate=False, original_max_position_embeddings=16))),
    # Gemma 4 as E2B/E4B: sliding layers (head 16, window 4) and full layers with their own head
    # dim (32) and proportional RoPE over a quarter of it, v norms, per-layer input embeddings,
    # the last two layers reusing keys and values of layers 2 and 3 with MLPs twice as wide.
    'gemma4': ('Gemma4TextConfig', dict(
        num_hidden_layers=6, head_dim=16, global_head_dim=32, sliding_window=4,
        layer_types=['sliding_attention', 'full_attention'] * 3, num_kv_shared_layers=2,
        use_double_wide_mlp=True, hidden_size_per_layer_input=8, vocab_size_per_layer_input=128,
        final_logit_softcapping=3.0)),
    # Gemma 4 as 31B: full layers whose values are their keys' projection, with 1 KV head.
    'gemma4_k_eq_v': ('Gemma4TextConfig', dict(
        num_hidden_layers=4, head_dim=16, global_head_dim=32, sliding_window=4,
        layer_types=['sliding_attention', 'full_attention'] * 2, attention_k_eq_v=True,
        num_global_key_value_heads=1, hidden_size_per_layer_input=0, tie_word_embeddings=False,
        rope_parameters={'full_attention': dict(rope_type='proportional', rope_theta=1e6,
                                                partial_rotary_factor=0.5, factor=2.0),
                         'sliding_attention': dict(rope_type='default', rope_theta=1e4)})),
    # Gemma 4 as 26B-A4B: in every layer top-2 of 4 experts beside the dense MLP, each branch on
    # its own norms, the router on the un-normed residual with learned input and expert scales.
    'gemma4_moe': ('Gemma4TextConfig', dict(
        num_hidden_layers=4, head_dim=16, global_head_dim=32, sliding_window=4,
        layer_types=['sliding_attention', 'full_attention'] * 2, attention_k_eq_v=True,
        num_global_key_value_heads=1, hidden_size_per_layer_input=0, enable_moe_block=True,
        num_experts=4, top_k_experts=2, moe_intermediate_size=16, final_logit_softcapping=3.0)),
}
TOKENS = np.random.default_rng(0).integers(3, 128, (2, 16)).astype(np.int32)


def make_hf_model(family, path):
  """A tiny random `family` model saved by transformers; norms and biases random too."""
  cls, extra = FAMILIES[family]
  config = getattr(transformers, cls)(**{**COMMON, **extra})
  config._attn_implementation = 'eager'  # pylint: disable=protected-access
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
  gen = torch.Generator().manual_seed(1)
  # Gemma's and Qwen3.5's norms multiply by (1 + weight): their weights start near 0.
  # Gemma 4's multiply by the weight, as Llama's; its layer scalars are buffers, set too.
  offset_norms = family.startswith(('gemma', 'qwen3_')) and not family.startswith('gemma4')
  with torch.no_grad():
    for name, p in model.named_parameters():
      # Gemma 4's MoE: its branch norms (norm_1, norm_2) and router scales multiply as norms do;
      # its router is drawn wider, so that the top-k choice is decisive rather than a near tie.
      is_norm = name.endswith(('norm.weight', 'norm_1.weight', 'norm_2.weight', 'router.scale',
                               'per_expert_scale'))
      std = (0.3 if is_norm or name.endswith('.bias') else
             1.0 if name.endswith('router.proj.weight') else 0.2)
      p.copy_((1.0 if is_norm and not offset_norms else 0.0) + std * torch.randn(p.shape, generator=gen))
    for name, p in model.named_buffers():
      if name.endswith('layer_scalar'):
        p.copy_(0.5 + torch.rand(p.shape, generator=gen))
  model.save_pretrained(path)
  return model


def lm_import(path):
  c = tiny_config()
  c.model.update(hf.model_config_from_hf(hf.read_config(path)))
  spec = ModelSpec(c.model)
  shardings = {n: jax.sharding.SingleDeviceSharding(jax.devices()[0]) for n in spec.names}
  return c, spec, hf.load_params(str(path), spec, shardings)


def tensors(path):
  reader = Reader(str(path))
  return {n: np.array(reader.get(n)) for n in reader.names()}


@pytest.mark.parametrize('family', list(FAMILIES))
def test_family_matches_transformers(family, tmp_path):
  model = make_hf_model(family, tmp_path / 'hf')
  with torch.no_grad():
    reference = model(torch.from_numpy(TOKENS.astype(np.int64))).logits.numpy()
  c, spec, params = lm_import(tmp_path / 'hf')
  ours = np.asarray(jax.jit(lambda p: spec.bind(p)(TOKENS))(params))
  error = float(np.max(np.abs(ours - reference)))
  print(f'{family}: max |dlogit| {error:.2e} (logit std {np.std(reference):.2f})')
  assert error <= 1e-4 and np.std(reference) > 0.3

  # Greedy decoding: lm's KV-cache generator against transformers' generate, 12 new tokens past
  # the sliding windows (4 and 6), so windowed cached decoding is exercised.
  # No end-of-sequence id on either side: both generate all N tokens, whatever they are.
  prompt, N = TOKENS[:1, :6], 12
  model.generation_config.eos_token_id = None
  with torch.no_grad():
    expected = model.generate(torch.from_numpy(prompt.astype(np.int64)), max_new_tokens=N,
                              do_sample=False, pad_token_id=0)[0, 6:].numpy()
  assert len(expected) == N
  fn = generate_lib.make_generate_fn(spec, generate_lib.Sampling(max_new_tokens=N), eos_id=-1,
                                     pad_id=0)
  out, _ = jax.jit(fn)(params, prompt, np.asarray([6], np.int32), jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(out)[0], expected)

  # Export writes back exactly the tensors transformers saved (fused Phi-3 layers included).
  hf.save(str(tmp_path / 'out'), params, c.model)
  original, exported = tensors(tmp_path / 'hf' / 'model.safetensors'), tensors(
      tmp_path / 'out' / 'model.safetensors')
  assert sorted(exported) == sorted(original)
  for name, value in original.items():
    np.testing.assert_array_equal(exported[name], value, err_msg=name)
  config = json.loads((tmp_path / 'out' / 'config.json').read_text())
  assert config['architectures'] == hf.read_config(tmp_path / 'hf')['architectures']
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / 'out', attn_implementation='eager').float().eval()  # as the reference
  with torch.no_grad():
    again = reloaded(torch.from_numpy(TOKENS.astype(np.int64))).logits.numpy()
  assert np.max(np.abs(again - reference)) <= 1e-5


def test_per_layer_windows_and_rope_compile_as_one_scan():
  config = hf.model_config_from_hf({**COMMON, **FAMILIES['gemma3'][1], 'model_type': 'gemma3_text',
                                    'architectures': ['Gemma3ForCausalLM']})
  c = tiny_config(**{**config, 'n_layers': 4, 'layer_types': ('sliding', 'full') * 2})
  spec = ModelSpec(c.model)
  params = spec.init(jax.random.key(0))
  text = jax.jit(lambda p: spec.bind(p)(TOKENS)).lower(params).as_text()
  assert text.count('stablehlo.while') == 1  # the layer scan; a switch, not one copy per layer
  assert 'stablehlo.case' in text


def test_mixed_layers_scanned_equal_unrolled_with_gradients():
  """Sliding and full layers with their own RoPE, soft-caps, q/k and post norms: the scan gives
  the unrolled layers' logits and gradients (remat on, as in training)."""
  c = tiny_config(layer_types=('sliding', 'full'), sliding_window=4,
                  rope_local_theta=100.0, rope_scaling={'type': 'yarn', 'factor': 2.0,
                                                        'original_max_seq_len': 16},
                  qk_norm=True, norm_placement='sandwich', query_pre_attn_scalar=12.0,
                  attn_logit_softcap=2.0, final_logit_softcap=5.0, attn_out_bias=True,
                  qkv_bias=True, mlp_bias=True, remat='full')
  tokens = TOKENS[:, :12] % c.model.vocab_size
  results = []
  for scan in (True, False):
    c.model.scan_layers = scan
    spec = ModelSpec(c.model)
    params = spec.init(jax.random.key(0))
    loss = lambda p, spec=spec: jax.numpy.mean(jax.nn.log_softmax(spec.bind(p)(tokens))[..., 0])
    results.append(jax.jit(jax.value_and_grad(loss))(params))
  (loss_scan, grad_scan), (loss_unrolled, grad_unrolled) = results
  np.testing.assert_allclose(loss_scan, loss_unrolled, rtol=1e-6)
  for name in grad_scan:
    np.testing.assert_allclose(grad_scan[name], grad_unrolled[name], atol=1e-6, err_msg=name)
  assert float(np.max(np.abs(grad_scan['layers.attn.q_norm.scale']))) > 0


def test_unsupported_variants_are_one_line_errors(tmp_path):
  base = {**COMMON, 'model_type': 'llama', 'architectures': ['LlamaForCausalLM']}
  with pytest.raises(CheckpointError, match=r"unsupported architecture GPT2LMHeadModel "
                                            r"\(model_type 'gpt2'\); lm imports LlamaForCausalLM, "
                                            r".*Qwen3ForCausalLM, .*Phi3ForCausalLM"):
    hf.model_config_from_hf({**base, 'model_type': 'gpt2', 'architectures': ['GPT2LMHeadModel']})
  with pytest.raises(ConfigError, match=r"rope type 'longrope' is not supported; lm implements "
                                        r"default, llama3, linear, yarn, proportional$"):
    hf.model_config_from_hf({**base, 'rope_scaling': {'rope_type': 'longrope', 'factor': 2.0}})
  # Gemma 4's Mixture-of-Experts block (26B-A4B): a top k above its experts, or none, is one
  # line naming the config.json key, before anything is built.
  gemma4 = {**COMMON, **FAMILIES['gemma4_moe'][1], 'model_type': 'gemma4_text',
            'architectures': ['Gemma4ForCausalLM']}
  with pytest.raises(CheckpointError, match=r"^Gemma4ForCausalLM with top_k_experts=5 is not "
                                            r"supported; it routes each token to at most "
                                            r"num_experts=4 experts$"):
    hf.model_config_from_hf({**gemma4, 'top_k_experts': 5})
  with pytest.raises(CheckpointError, match=r"^Gemma4ForCausalLM with moe_intermediate_size=None "
                                            r"is not supported; enable_moe_block needs it"):
    hf.model_config_from_hf({**gemma4, 'moe_intermediate_size': None})
  c = tiny_config(rope_scaling={'type': 'dynamic', 'factor': 2.0})
  with pytest.raises(ConfigError, match="rope_scaling type 'dynamic' is not supported"):
    config_lib.validate(c)
  # A Phi-3 checkpoint whose fused qkv_proj does not fit its config: the tensor and both shapes.
  make_hf_model('phi3', tmp_path)
  config = hf.read_config(tmp_path)
  config['num_key_value_heads'] = 4
  (tmp_path / 'config.json').write_text(json.dumps(config))
  with pytest.raises(CheckpointError, match=r"'model.layers.0.self_attn.qkv_proj.weight' has shape "
                                            r"\(128, 64\), but the config implies \(192, 64\)"):
    lm_import(tmp_path)


def test_hybrid_checkpoint_whose_tensors_do_not_fit_is_one_line(tmp_path):
  """A Qwen3.5 directory whose config.json says more DeltaNet value heads than its tensors hold:
  the error names the fused tensor, its shape and the parameter it cannot hold."""
  make_hf_model('qwen3_5', tmp_path)
  config = hf.read_config(tmp_path)
  config['linear_num_value_heads'] = 8
  (tmp_path / 'config.json').write_text(json.dumps(config))
  with pytest.raises(CheckpointError, match=r"tensor 'model.layers.0.linear_attn.out_proj.weight' "
                                            r"has shape \(64, 32\), but the config implies "
                                            r"\(64, 64\) \(lm parameter 'layers.linear_attn.o.kernel'\)"):
    lm_import(tmp_path)
  # A fused tensor that does not fit: each parameter it should hold, with its shape.
  (tmp_path / 'model.safetensors').unlink()
  with pytest.raises(CheckpointError):
    lm_import(tmp_path)
  reader_config = hf.model_config_from_hf(config)
  from lm.io.families import qwen3_5  # pylint: disable=import-outside-toplevel
  c = tiny_config()
  c.model.update(reader_config)
  table = qwen3_5.linear_attention_tensors(ModelSpec(c.model).cfg)
  conv = table[('layers.linear_attn.conv_q', 'layers.linear_attn.conv_k', 'layers.linear_attn.conv_v')]
  with pytest.raises(ValueError):  # 64 channels cannot hold q, k and v of 2·8 + 2·8 + 8·8
    conv.to_lm(np.zeros((64, 1, 4), np.float32))


def _hf_weights_with_random_adapters(c, hf_dir):
  """(spec, params): the HF model's weights in lm and LoRA adapters whose B is random, so that
  they change the logits."""
  spec = ModelSpec(c.model)
  shardings = {n: jax.sharding.SingleDeviceSharding(jax.devices()[0]) for n in spec.names}
  base = hf.load_params(str(hf_dir), spec, shardings)
  fresh = spec.init(jax.random.key(0))
  keys = iter(jax.random.split(jax.random.key(1), len(fresh)))
  params = {n: base.get(n, 0.1 * jax.random.normal(next(keys), v.shape) if n.endswith('lora_b')
                        else v) for n, v in fresh.items()}
  return spec, params


def _peft_and_lm_logits(peft, model, model_cfg, spec, params, tmp_path):
  """lm's adapters saved as PEFT files and loaded by peft.PeftModel onto the transformers model:
  (the file's sorted target_modules, PEFT's logits with adapters off, with them on, lm's)."""
  from lm.io import peft as peft_io  # pylint: disable=import-outside-toplevel
  peft_io.save_peft(str(tmp_path / 'adapter'), params, model_cfg)
  adapter_config = json.loads((tmp_path / 'adapter' / 'adapter_config.json').read_text())
  peft_model = peft.PeftModel.from_pretrained(model, str(tmp_path / 'adapter')).eval()
  with torch.no_grad():
    got = peft_model(torch.from_numpy(TOKENS.astype(np.int64))).logits.float().numpy()
    with peft_model.disable_adapter():
      before = peft_model(torch.from_numpy(TOKENS.astype(np.int64))).logits.float().numpy()
  expected = np.asarray(jax.jit(lambda p: spec.bind(p)(TOKENS))(params))
  return sorted(adapter_config['target_modules']), before, got, expected


def test_lora_adapters_on_a_hybrid_model_load_in_peft(tmp_path):
  """Qwen3.5: LoRA on the full-attention k/v/o, the MLPs and the DeltaNet's own projections
  exports as PEFT files that peft.PeftModel loads onto the transformers model with lm's logits;
  the projections fused in one HF tensor (q with its gate, DeltaNet q/k/v) are refused in one
  line."""
  peft = pytest.importorskip('peft')
  from lm.io import peft as peft_io  # pylint: disable=import-outside-toplevel
  model = make_hf_model('qwen3_5', tmp_path / 'hf')
  c = tiny_config()
  c.model.update(hf.model_config_from_hf(hf.read_config(tmp_path / 'hf')))
  c.model.lora.update(rank=2, alpha=4.0,
                      targets=r'layers\.(attn\.(k|v|o)|mlp\.|linear_attn\.(z|b|a|o))')
  spec, params = _hf_weights_with_random_adapters(c, tmp_path / 'hf')
  targets, before, got, expected = _peft_and_lm_logits(peft, model, c.model, spec, params, tmp_path)
  assert targets == [
      'down_proj', 'gate_proj', 'in_proj_a', 'in_proj_b', 'in_proj_z', 'k_proj', 'o_proj',
      'out_proj', 'up_proj', 'v_proj']
  assert np.max(np.abs(before - expected)) > 0.1  # the adapters matter
  error = float(np.max(np.abs(got - expected)))
  print(f'qwen3_5 PEFT: max |dlogit| {error:.2e}')
  assert error <= 1e-4
  c.model.lora.targets = r'layers\.attn\.'
  spec = ModelSpec(c.model)
  zeros = {n: np.zeros(s.shape, s.dtype) for n, s in spec.shapes.items()}
  with pytest.raises(CheckpointError, match=r'^PEFT export of LoRA on layers\.attn\.gate is not '
                                            r'supported for qwen3_5_text: its Hugging Face tensor'):
    peft_io.save_peft(str(tmp_path / 'refused'), zeros, c.model)


def test_llama_attention_bias_imports_q_k_v_and_o_biases(tmp_path):
  """Llama attention_bias puts biases on q, k, v and o; lm reads all four (it used to refuse them, naming only o_proj)."""
  make_hf_model('llama_bias', tmp_path)
  c, spec, params = lm_import(tmp_path)
  assert c.model.qkv_bias and c.model.attn_out_bias and c.model.mlp_bias
  assert {'layers.attn.o.bias', 'layers.mlp.down.bias'} <= set(params)
  assert hf.family_of(c.model) == 'llama'


def test_peft_adapters_of_a_run_from_hf_load_with_auto_peft(tmp_path):
  """A LoRA run started from a HF directory exports adapters whose adapter_config.json names
  that directory, so AutoPeftModelForCausalLM rebuilds the model lm trained."""
  peft = pytest.importorskip('peft')
  from lm.io import pretrained  # pylint: disable=import-outside-toplevel
  from lm.model import lora  # pylint: disable=import-outside-toplevel
  from lm.train.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel
  from lm.train.loop import Trainer  # pylint: disable=import-outside-toplevel
  make_hf_model('qwen3', tmp_path / 'hf')
  c = tiny_config()
  c.train.update(init_from=str(tmp_path / 'hf'), trainable='lora')
  c.model.lora.update(rank=4, alpha=8.0, targets=r'attn\.(q|k|v|o)|mlp\.(gate|up|down)')
  trainer = Trainer(c, devices=jax.devices()[:1])
  state = trainer.init_state()
  keys = iter(jax.random.split(jax.random.key(1), len(state.params)))
  params = {n: v + 0.1 * jax.random.normal(next(keys), v.shape) if n.endswith('lora_b') else v
            for n, v in state.params.items()}
  run = tmp_path / 'run'
  ckpt = Checkpointer(str(run), async_save=False, labels=trainer.labels)
  ckpt.save(1, state.replace(params=params), {'position': 1})
  ckpt.close()
  (run / 'config.json').write_text(c.to_json_best_effort())

  pretrained.export_run(str(run), str(tmp_path / 'adapter'), adapters_only=True)
  adapter_config = json.loads((tmp_path / 'adapter' / 'adapter_config.json').read_text())
  assert adapter_config['base_model_name_or_path'] == str((tmp_path / 'hf').resolve())
  peft_model = peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / 'adapter')).eval()
  with torch.no_grad():
    got = peft_model(torch.from_numpy(TOKENS.astype(np.int64))).logits.float().numpy()
  merged_spec = ModelSpec(lora.without_adapters(c.model))
  merged = lora.merge(params, c.model.lora)
  expected = np.asarray(jax.jit(lambda p: merged_spec.bind(p)(TOKENS))(merged))
  with peft_model.disable_adapter(), torch.no_grad():
    base = peft_model(torch.from_numpy(TOKENS.astype(np.int64))).logits.float().numpy()
  assert np.max(np.abs(base - expected)) > 0.1  # the adapters matter
  error = float(np.max(np.abs(got - expected)))
  print(f'qwen3 PEFT: max |dlogit| {error:.2e}')
  assert error <= 1e-4


def test_gemma4_parts_scanned_equal_unrolled_with_lora_gradients():
  """Gemma 4's parts (own full layers, KV-shared layers reading keys and values through the scan's
  carry, wide MLPs, per-layer inputs, layer scalars) with LoRA on every attention and MLP part and
  remat on: the scan gives the unrolled layers' loss and gradients, compiled as one loop (layers
  0-3 one group of 2 twice; the two shared layers once, unrolled)."""
  fields = hf.model_config_from_hf({**COMMON, **FAMILIES['gemma4'][1], 'model_type': 'gemma4_text',
                                    'architectures': ['Gemma4ForCausalLM']})
  c = tiny_config(**fields, remat='full')
  c.model.lora.update(rank=2, alpha=4.0)
  tokens = TOKENS[:1, :8]
  results = []
  for scan in (True, False):
    c.model.scan_layers = scan
    spec = ModelSpec(c.model)
    params = {k: v + 0.1 if k.endswith('lora_b') else v for k, v in spec.init(jax.random.key(0)).items()}
    loss = lambda p, spec=spec: jax.numpy.mean(jax.nn.log_softmax(spec.bind(p)(tokens))[..., 0])
    step = jax.jit(jax.value_and_grad(loss))
    if scan:
      assert jax.jit(loss).lower(params).as_text().count('stablehlo.while') == 1
    results.append(step(params))
  (loss_scan, grad_scan), (loss_unrolled, grad_unrolled) = results
  np.testing.assert_allclose(loss_scan, loss_unrolled, rtol=1e-6)
  for name in grad_scan:
    np.testing.assert_allclose(grad_scan[name], grad_unrolled[name], atol=1e-6, err_msg=name)
  for name in ('layers.attn.k.lora_a', 'layers.attn_global.k.lora_b', 'layers.attn_reuse.q.lora_b',
               'layers.attn_global_reuse.o.lora_a', 'layers.mlp_wide.down.lora_b',
               'layers.per_layer_input.gate.kernel', 'layers.layer_scale.scale', 'embed_per_layer',
               'per_layer_proj.kernel'):
    assert float(np.max(np.abs(grad_scan[name]))) > 0, name
  assert not any(n.startswith(('layers.attn_reuse.k', 'layers.attn_reuse.v')) for n in grad_scan)


def test_gemma4_lora_adapters_load_in_peft(tmp_path):
  """Gemma 4 (E2B-style): LoRA on every attention stack (own full layers, KV-shared layers with q
  and o only) and on the normal and wide MLPs exports as PEFT files on q/k/v/o_proj and the MLP's
  projections, which peft.PeftModel loads onto the transformers model with lm's logits."""
  peft = pytest.importorskip('peft')
  model = make_hf_model('gemma4', tmp_path / 'hf')
  c = tiny_config()
  c.model.update(hf.model_config_from_hf(hf.read_config(tmp_path / 'hf')))
  c.model.lora.update(rank=2, alpha=4.0)
  spec, params = _hf_weights_with_random_adapters(c, tmp_path / 'hf')
  assert {'layers.attn_reuse.q.lora_a', 'layers.attn_global_reuse.o.lora_b',
          'layers.mlp_wide.up.lora_a'} <= set(params)
  targets, before, got, expected = _peft_and_lm_logits(peft, model, c.model, spec, params, tmp_path)
  assert targets == [
      'down_proj', 'gate_proj', 'k_proj', 'o_proj', 'q_proj', 'up_proj', 'v_proj']
  assert np.max(np.abs(before - expected)) > 0.1  # the adapters matter
  error = float(np.max(np.abs(got - expected)))
  print(f'gemma4 PEFT: max |dlogit| {error:.2e}')
  assert error <= 1e-4




def test_gemma4_moe_lora_trains_every_expert_and_the_dense_branch(tmp_path):
  """Gemma 4 MoE with LoRA on the default targets: two train steps move every adapter (each
  expert's gate/up/down, the dense MLP's, attention's) and nothing else, and the adapters merged
  into the kernels give the same logits. They export as PEFT files with the experts at Gemma 4's
  `experts.*` (beside the dense MLP's `mlp.*_proj`); gpt-oss's experts, whose layout lm writes no
  PEFT adapters for, are still one line."""
  from conftest import random_batch, train_steps  # pylint: disable=import-outside-toplevel
  from lm.io import peft as peft_io  # pylint: disable=import-outside-toplevel
  from lm.model import lora  # pylint: disable=import-outside-toplevel
  fields = hf.model_config_from_hf({**COMMON, **FAMILIES['gemma4_moe'][1], 'model_type': 'gemma4_text',
                                    'architectures': ['Gemma4ForCausalLM']})
  c = tiny_config(**{**fields, 'n_layers': 1, 'layer_types': ('full',)})  # one layer: compile
  c.model.lora.update(rank=2, alpha=4.0)
  c.train.trainable = 'lora'
  c.optimizer.weight_decay = 0.0  # a change must come from the gradient
  c.data.update(batch_size=2, seq_len=8)
  trainer, _, before, after = train_steps(c, steps=2)  # B starts at 0: A moves from the second
  assert after['layers.moe.gate.lora_a'].shape == (1, 4, 64, 2)  # [L, E, D, r]
  assert {'layers.moe.shared.up.lora_b', 'layers.attn_global.q.lora_a'} <= set(after)
  for name in before:
    diff = np.abs(np.asarray(after[name]) - np.asarray(before[name]))
    if lora.is_adapter(name):  # in every layer and, for the experts, every expert
      experts = name.startswith(('layers.moe.gate.', 'layers.moe.up.', 'layers.moe.down.'))
      assert (diff.reshape(*diff.shape[:2 if experts else 1], -1).max(axis=-1) > 0).all(), name
    else:
      assert not diff.any(), name

  merged = lora.merge(after, c.model.lora)
  base_spec = ModelSpec(lora.without_adapters(c.model))
  tokens = random_batch(c)['tokens']
  np.testing.assert_allclose(jax.jit(lambda p: base_spec.bind(p)(tokens))(merged),
                             jax.jit(lambda p: trainer.spec.bind(p)(tokens))(after),
                             rtol=1e-4, atol=1e-5)
  peft_io.save_peft(str(tmp_path / 'adapter'), after, c.model)
  config = json.loads((tmp_path / 'adapter' / 'adapter_config.json').read_text())
  assert config['target_parameters'] == ['experts.gate_up_proj', 'experts.down_proj']
  assert 'base_model.model.model.layers.0.experts.base_layer.lora_A.weight' in Reader(
      str(tmp_path / 'adapter' / 'adapter_model.safetensors')).names()
  gpt_oss = tiny_config(**hf.model_config_from_hf({**COMMON, **FAMILIES['gpt_oss'][1],
                                                   'model_type': 'gpt_oss'}))
  gpt_oss.model.lora.update(rank=2, targets=r'layers\.moe\.')
  zeros = {n: np.zeros(s.shape, s.dtype) for n, s in ModelSpec(gpt_oss.model).shapes.items()}
  with pytest.raises(CheckpointError, match=r'^PEFT export of LoRA on experts \(layers\.moe\.'
                                            r'(gate|up|down)\) is not supported for gpt_oss'):
    peft_io.save_peft(str(tmp_path / 'refused'), zeros, gpt_oss.model)


def test_gemma4_moe_lora_on_attention_dense_branch_and_experts_loads_in_peft(tmp_path):
  """Gemma 4 MoE: LoRA on every attention stack, on the dense MLP beside the experts and on every
  expert exports as PEFT files on q/k/v/o_proj, mlp.*_proj and the target_parameters
  experts.gate_up_proj / down_proj, which peft.PeftModel loads with lm's logits; lm reads the
  files back (gate and up sharing gate_up_proj's rank-4 A) with the same logits."""
  peft = pytest.importorskip('peft')
  from lm.io import peft as peft_io  # pylint: disable=import-outside-toplevel
  model = make_hf_model('gemma4_moe', tmp_path / 'hf')
  c = tiny_config()
  c.model.update(hf.model_config_from_hf(hf.read_config(tmp_path / 'hf')))
  c.model.lora.update(rank=2, alpha=4.0, targets=r'layers\.(attn\w*|moe)\.')
  spec, params = _hf_weights_with_random_adapters(c, tmp_path / 'hf')
  assert {'layers.attn_global.q.lora_a', 'layers.moe.shared.down.lora_b',
          'layers.moe.gate.lora_a', 'layers.moe.down.lora_b'} <= set(params)
  targets, before, got, expected = _peft_and_lm_logits(peft, model, c.model, spec, params, tmp_path)
  assert targets == ['down_proj', 'gate_proj', 'k_proj', 'o_proj', 'q_proj', 'up_proj', 'v_proj']
  config = json.loads((tmp_path / 'adapter' / 'adapter_config.json').read_text())
  assert config['target_parameters'] == ['experts.gate_up_proj', 'experts.down_proj']
  assert np.max(np.abs(before - expected)) > 0.1  # the adapters matter
  error = float(np.max(np.abs(got - expected)))
  print(f'gemma4_moe PEFT: max |dlogit| {error:.2e}')
  assert error <= 1e-4
  c.model.lora.update(peft_io.lora_config_from_peft(config))
  back_spec = ModelSpec(c.model)
  assert back_spec.cfg.lora.rank == 4
  back = {**{n: v for n, v in params.items() if not n.endswith(('lora_a', 'lora_b'))},
          **peft_io.load_peft(str(tmp_path / 'adapter'), back_spec)}
  error = float(np.max(np.abs(np.asarray(jax.jit(lambda p: back_spec.bind(p)(TOKENS))(back))
                              - expected)))
  print(f'gemma4_moe PEFT read back: max |dlogit| {error:.2e}')
  assert error <= 1e-5
