"""Each family's MoE block, module against module: transformers' own block with random weights,
the same weights copied into lm's MoE layer, outputs within float32 noise. Both of lm's expert
paths (grouped and the dense reference) are checked."""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx

from lm import config as config_lib
from lm.errors import ConfigError
from lm.model import moe, routers

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

D, E, F, k = 32, 8, 16, 2


def lm_layer(implementation, **moe_fields):
  c = tiny_config(d_model=D)
  c.model.moe.update(n_experts=E, experts_per_token=k, expert_dim=F, implementation=implementation,
                     **moe_fields)
  config_lib.validate(c)
  return moe.MoE(c.model, rngs=nnx.Rngs(0))


def randomize(module, seed, std=0.3, router_std=1.0):
  """Every parameter and buffer of a torch module drawn at random (routers wider, so the top-k
  choice is decisive rather than a near tie)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in [*module.named_parameters(), *module.named_buffers()]:
      scale = router_std if ('gate.' in name or 'router' in name) else std
      p.copy_(torch.randn(p.shape, generator=g) * scale)


def put(variable, value):
  variable[...] = jnp.asarray(np.asarray(value, np.float32))


def t(x):
  return x.detach().numpy()


def compare(layer, block, x_BTD, out_of=lambda o: o, atol=2e-5):
  with torch.no_grad():
    expected = t(out_of(block(torch.from_numpy(x_BTD)))).reshape(x_BTD.shape)
  y, stats = layer(jnp.asarray(x_BTD))
  np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-4, atol=atol)
  np.testing.assert_allclose(np.sum(np.asarray(stats['expert_fraction'])), k, rtol=1e-6)
  return expected


X = np.random.default_rng(0).standard_normal((2, 8, D)).astype(np.float32)


def copy_fused_experts(layer, experts):
  """Qwen3-Next / GLM-4.5 / DeepSeek-V3 layout: gate_up_proj [E, 2F, D] (gate rows first),
  down_proj [E, D, F]."""
  gate_up = t(experts.gate_up_proj)
  put(layer.gate.kernel, gate_up[:, :F].transpose(0, 2, 1))
  put(layer.up.kernel, gate_up[:, F:].transpose(0, 2, 1))
  put(layer.down.kernel, t(experts.down_proj).transpose(0, 2, 1))


def copy_mlp(mlp, hf_mlp):
  for name in ('gate', 'up', 'down'):
    put(getattr(mlp, name).kernel, t(getattr(hf_mlp, name + '_proj').weight).T)


@pytest.mark.parametrize('implementation', ['ragged', 'dense'])
def test_qwen3_next_block_softmax_router_and_gated_shared_expert(implementation):
  from transformers.models.qwen3_next import modeling_qwen3_next as hf_mod
  cfg = transformers.Qwen3NextConfig(hidden_size=D, num_experts=E, num_experts_per_tok=k,
                                     moe_intermediate_size=F, shared_expert_intermediate_size=24,
                                     norm_topk_prob=True)
  block = hf_mod.Qwen3NextSparseMoeBlock(cfg).eval()
  randomize(block, 0)
  layer = lm_layer(implementation, router='softmax', norm_topk_prob=True, shared_dim=24,
                   shared_gate=True)
  put(layer.router, t(block.gate.weight).T)
  copy_fused_experts(layer, block.experts)
  copy_mlp(layer.shared, block.shared_expert)
  put(layer.shared_gate, t(block.shared_expert_gate.weight)[0])
  compare(layer, block, X)


@pytest.mark.parametrize('implementation', ['ragged', 'dense'])
def test_glm4_moe_block_biased_sigmoid_group_limited_routing(implementation):
  from transformers.models.glm4_moe import modeling_glm4_moe as hf_mod
  cfg = transformers.Glm4MoeConfig(hidden_size=D, n_routed_experts=E, num_experts_per_tok=k,
                                   moe_intermediate_size=F, n_shared_experts=2, n_group=4,
                                   topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True)
  block = hf_mod.Glm4MoeMoE(cfg).eval()
  randomize(block, 1)
  layer = lm_layer(implementation, router='sigmoid', n_group=4, topk_group=2,
                   routed_scaling_factor=2.5, norm_topk_prob=True, shared_dim=2 * F)
  put(layer.router, t(block.gate.weight).T)
  put(layer.correction_bias, t(block.gate.e_score_correction_bias))
  copy_fused_experts(layer, block.experts)
  copy_mlp(layer.shared, block.shared_experts)
  compare(layer, block, X)

  # The correction bias steers the choice only: with it, the choice differs from the plain
  # scores' for some tokens, and the weights stay the plain scores (so the outputs differ).
  logits = X.reshape(-1, D) @ t(block.gate.weight).T
  plain = routers.route('sigmoid', jnp.asarray(logits), k, n_group=4, topk_group=2)[1]
  biased = routers.route('sigmoid', jnp.asarray(logits), k, n_group=4, topk_group=2,
                         correction_E=jnp.asarray(t(block.gate.e_score_correction_bias)))[1]
  assert not np.array_equal(np.sort(plain, -1), np.sort(biased, -1))


def test_deepseek_v3_block_is_the_same_router():
  from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_mod
  cfg = transformers.DeepseekV3Config(hidden_size=D, n_routed_experts=E, num_experts_per_tok=k,
                                      moe_intermediate_size=F, n_shared_experts=1, n_group=2,
                                      topk_group=1, routed_scaling_factor=1.5, norm_topk_prob=False)
  block = hf_mod.DeepseekV3MoE(cfg).eval()
  randomize(block, 2)
  layer = lm_layer('ragged', router='sigmoid', n_group=2, topk_group=1, routed_scaling_factor=1.5,
                   norm_topk_prob=False, shared_dim=F)
  put(layer.router, t(block.gate.weight).T)
  put(layer.correction_bias, t(block.gate.e_score_correction_bias))
  copy_fused_experts(layer, block.experts)
  copy_mlp(layer.shared, block.shared_experts)
  compare(layer, block, X)


@pytest.mark.parametrize('implementation', ['ragged', 'dense'])
def test_gpt_oss_block_router_bias_expert_biases_and_clamped_swiglu(implementation):
  from transformers.models.gpt_oss import modeling_gpt_oss as hf_mod
  cfg = transformers.GptOssConfig(hidden_size=D, num_local_experts=E, num_experts_per_tok=k,
                                  intermediate_size=F)
  block = hf_mod.GptOssMLP(cfg).eval()
  randomize(block, 3, std=1.0)  # wide enough that the clamp at swiglu_limit=7 bites
  layer = lm_layer(implementation, router='topk_softmax', router_bias=True, expert_bias=True,
                   swiglu_limit=cfg.swiglu_limit, swiglu_alpha=cfg.swiglu_alpha)
  put(layer.router, t(block.router.weight).T)
  put(layer.router_bias, t(block.router.bias))
  gate_up, gate_up_bias = t(block.experts.gate_up_proj), t(block.experts.gate_up_proj_bias)
  put(layer.gate.kernel, gate_up[..., ::2])  # [E, D, 2F] with gate and up interleaved
  put(layer.up.kernel, gate_up[..., 1::2])
  put(layer.gate.bias, gate_up_bias[:, ::2])
  put(layer.up.bias, gate_up_bias[:, 1::2])
  put(layer.down.kernel, t(block.experts.down_proj))
  put(layer.down.bias, t(block.experts.down_proj_bias))
  x = X * 3
  gate = np.einsum('nd,edf->nef', x.reshape(-1, D), gate_up[..., ::2])
  assert np.max(gate) > cfg.swiglu_limit  # the clamp is exercised
  # Outputs reach a few hundred here: float32 noise is 1e-4 of them, not 1e-4 absolute.
  compare(layer, block, x, out_of=lambda o: o[0], atol=1e-3)


@pytest.mark.parametrize('implementation', ['ragged', 'dense'])
def test_llama4_block_top1_sigmoid_on_the_input_and_shared_expert(implementation):
  from transformers.models.llama4 import modeling_llama4 as hf_mod
  cfg = transformers.Llama4TextConfig(hidden_size=D, num_local_experts=E, num_experts_per_tok=1,
                                      intermediate_size=F)
  block = hf_mod.Llama4TextMoe(cfg).eval()
  randomize(block, 4)
  c = tiny_config(d_model=D)
  c.model.moe.update(n_experts=E, experts_per_token=1, expert_dim=F, implementation=implementation,
                     router='topk_sigmoid', shared_dim=F)
  layer = moe.MoE(c.model, rngs=nnx.Rngs(0))
  put(layer.router, t(block.router.weight).T)
  gate_up = t(block.experts.gate_up_proj)  # [E, D, 2F], gate columns first
  put(layer.gate.kernel, gate_up[..., :F])
  put(layer.up.kernel, gate_up[..., F:])
  put(layer.down.kernel, t(block.experts.down_proj))
  copy_mlp(layer.shared, block.shared_expert)
  with torch.no_grad():
    expected = t(block(torch.from_numpy(X))[0]).reshape(X.shape)
  y, _ = layer(jnp.asarray(X))
  np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize('implementation', ['ragged', 'dense'])
def test_gemma4_router_scales_and_experts(implementation):
  """Gemma 4's router (weightless RMSNorm times a learned scale and D^-1/2, softmax top-k
  renormalised, times per-expert scales) and its fused experts; its dense MLP and branch norms
  are checked with the whole model (tests/io/test_hf_families.py, gemma4_moe)."""
  from transformers.models.gemma4 import modeling_gemma4 as hf_mod
  cfg = transformers.Gemma4TextConfig(hidden_size=D, num_experts=E, top_k_experts=k,
                                      moe_intermediate_size=F, enable_moe_block=True)
  router, experts = hf_mod.Gemma4TextRouter(cfg).eval(), hf_mod.Gemma4TextExperts(cfg).eval()
  randomize(router, 5, std=1.0)  # the scales too: far from 1, so a missed one shows
  randomize(experts, 6)
  c = tiny_config(d_model=D, mlp_activation='gelu_tanh')  # Gemma's GeGLU experts
  c.model.moe.update(n_experts=E, experts_per_token=k, expert_dim=F, implementation=implementation,
                     router='scaled_softmax')
  layer = moe.MoE(c.model, rngs=nnx.Rngs(0))
  put(layer.router, t(router.proj.weight).T)
  put(layer.router_scale, t(router.scale))
  put(layer.expert_scale, t(router.per_expert_scale))
  copy_fused_experts(layer, experts)
  def block(x):
    _, weights, chosen = router(x.reshape(-1, D))
    return experts(x.reshape(-1, D), chosen, weights)
  compare(layer, block, X)


def test_bias_update_moves_towards_balance():
  correction = jnp.zeros((2, 4))
  load = jnp.asarray([[1.0, 0.5, 0.25, 0.25], [0.5, 0.5, 0.5, 0.5]])  # k=2 over 4 experts
  new = np.asarray(routers.bias_update(correction, load, 0.001))
  np.testing.assert_allclose(new, [[-0.001, 0.0, 0.001, 0.001], [0, 0, 0, 0]], atol=0)


def test_unsatisfiable_routing_settings_are_one_line_errors():
  cases = ((dict(n_experts=4, experts_per_token=5), 'experts_per_token'),
           (dict(n_experts=8, router='sigmoid', n_group=3, topk_group=1), 'does not split'),
           (dict(n_experts=8, router='sigmoid', n_group=4, topk_group=1, experts_per_token=4),
            'cannot hold'),
           (dict(n_experts=8, router='sigmoid', n_group=4, topk_group=5), 'cannot hold'),
           (dict(n_experts=8, router='softmax', n_group=2, topk_group=1), 'limits only'),
           (dict(n_experts=8, router='top2'), 'router'),
           (dict(n_experts=8, router='scaled_softmax', branch_norms=True), 'branch_norms'))
  for fields, match in cases:
    c = tiny_config()
    c.model.moe.update(fields)
    with pytest.raises(ConfigError, match=match) as e:
      config_lib.validate(c)
    assert '\n' not in str(e.value)
