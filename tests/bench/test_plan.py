"""`lm plan`: targets, analytic step FLOPs per mode, and the step compiled for a real TPU and GPU."""

import argparse
import dataclasses
import os
import shlex
import subprocess
import types

import jax
import numpy as np
import pytest
from conftest import ROOT, tiny_config

import lm_runs
from lm import config as config_lib
from lm.bench import plan as plan_lib
from lm.bench import targets
from lm.train import step_flops
from lm.config import head_dim
from lm.errors import ConfigError, UserError
from lm.train import flops as train_flops
from lm.train.loop import Trainer
from lm.train.state import ModelSpec


@pytest.mark.parametrize('name,platform,devices,groups', [
    ('v5p-8', 'tpu', 4, 1), ('v4-8', 'tpu', 4, 1), ('v6e-8', 'tpu', 8, 1), ('v5e-16', 'tpu', 16, 1),
    ('2xv5p-8', 'tpu', 8, 2), ('h100x8', 'gpu', 8, 1), ('H200x8', 'gpu', 8, 1), ('2xh100x8', 'gpu', 16, 2)])
def test_target_names(name, platform, devices, groups):
  t = targets.parse(name)
  assert (t.platform, t.device_count, t.groups) == (platform, devices, groups)


def test_tpu_slice_shapes():
  assert targets.tpu_shape(4, 3) == (2, 2, 1)
  assert targets.tpu_shape(16, 3) == (2, 2, 4)
  assert targets.tpu_shape(64, 3) == (4, 4, 4)
  assert targets.tpu_shape(8, 2) == (2, 4)
  assert targets.tpu_shape(16, 2) == (4, 4)
  assert targets.tpu_shape(256, 2) == (16, 16) and targets.tpu_shape(256, 3) == (4, 8, 8)


@pytest.mark.parametrize('name, chips, last_chip, kind', [
    ('h100x1', 1, None, 'H100'), ('h200x1', 1, None, 'H200'),
    ('v6e-256', 256, [15, 15, 0], 'TPU v6 lite'), ('v5p-512', 256, [3, 7, 7], 'TPU v5')])
def test_single_gpus_and_256_chip_slices_build_their_compilers_devices(name, chips, last_chip, kind):
  devices = targets.parse(name).devices()
  assert len(devices) == chips and kind in devices[0].device_kind
  if last_chip:  # v6e-256 is a 16x16 grid of chips, v5p-512 a 4x8x8 cube
    assert max(devices, key=lambda d: d.id).coords == last_chip


@pytest.mark.parametrize('name', ['v7-8', 'a100x8', 'v5p-3', 'h100x16', 'v6e-12'])
def test_unknown_targets_are_one_line(name):
  with pytest.raises(UserError) as e:
    targets.parse(name)
  assert name in str(e.value) and '\n' not in str(e.value)


def _flops(**changes):
  c = tiny_config()
  for key, value in changes.items():
    section, field = key.split('__')
    if isinstance(value, dict):
      c[section][field].update(value)
    else:
      c[section][field] = value
  return step_flops.step_flops(Trainer(c, devices=jax.devices()[:1]))


def test_full_training_flops_match_6n_plus_attention():
  c = tiny_config()
  f = _flops()
  tokens = c.data.batch_size * c.data.seq_len
  assert f.tokens == tokens and f.recompute == 0 and f.reference == 0
  N = train_flops.matmul_params(c.model)
  attention = 12 * c.model.n_layers * c.model.n_heads * head_dim(c.model) * (c.data.seq_len + 1) / 2
  assert f.model == pytest.approx((6 * N + attention) * tokens)
  assert f.weight_grads == pytest.approx(2 * N * tokens)


def test_lora_costs_no_base_weight_gradients():
  full, lora = _flops(), _flops(model__lora=dict(rank=4), train__trainable='lora')
  adapters = lora.forward - full.forward  # the adapters' own forward
  assert adapters > 0 and lora.weight_grads == pytest.approx(adapters)
  assert lora.input_grads == pytest.approx(full.input_grads + adapters)
  assert lora.model == pytest.approx(full.model - full.weight_grads + 3 * adapters)  # ~4N, not 6N


def test_frozen_layers_skip_the_backward_below_them():
  c = tiny_config()
  full = _flops()
  assert _flops(train__trainable='freeze_embeddings').model == pytest.approx(full.model)
  top = _flops(train__trainable='freeze_first_layers:1')  # the embedding trains: the backward
  assert top.input_grads == pytest.approx(full.input_grads)  # still reaches the bottom, and stacked
  assert top.weight_grads == pytest.approx(full.weight_grads)  # rows all get weight gradients
  head_and_norm = _flops(train__trainable='regex:final_norm|lm_head')  # no layer needs a gradient
  assert head_and_norm.input_grads == pytest.approx(2 * c.model.d_model * c.model.vocab_size
                                                    * head_and_norm.tokens)
  # Only the head trains: nothing below it needs a gradient.
  head = _flops(train__trainable='regex:^lm_head')
  assert head.input_grads == 0 and head.weight_grads == pytest.approx(
      2 * c.model.d_model * c.model.vocab_size * head.tokens)


def test_remat_recompute_is_counted_apart_from_model_flops():
  none, full, dots = _flops(), _flops(model__remat='full'), _flops(model__remat='dots')
  assert full.model == pytest.approx(none.model) and dots.recompute == 0
  c = tiny_config()
  layer_forward = none.forward - 2 * c.model.d_model * c.model.vocab_size * none.tokens
  assert full.recompute == pytest.approx(layer_forward)


def test_dpo_counts_both_replies_and_the_reference_forward():
  c = tiny_config()
  f = _flops(train__objective='dpo')
  assert f.tokens == 2 * c.data.batch_size * c.data.seq_len
  assert f.reference == pytest.approx(f.forward)


# Qwen3.5's layer kinds at test size: gated DeltaNet and gated full attention, 3 : 1.
HYBRID = dict(layer_types=('linear', 'linear', 'linear', 'full'), n_layers=4, attn_output_gate=True,
              partial_rotary_factor=0.25, qk_norm=True, norm_offset=1.0,
              linear_attn=dict(n_key_heads=2, n_value_heads=4, key_head_dim=8, value_head_dim=8))


def test_matmul_params_are_the_kernels_of_every_layer_kind():
  c = tiny_config(**HYBRID)
  shapes = ModelSpec(c.model).shapes
  kernels = sum(int(np.prod(s.shape)) for n, s in shapes.items() if n.endswith('.kernel'))
  assert any(n.startswith('layers.linear_attn.') for n in shapes) and 'layers.attn.gate.kernel' in shapes
  assert train_flops.matmul_params(c.model) == kernels  # untied: lm_head.kernel is D x V


def test_hybrid_flops_count_attention_only_on_attention_layers():
  c = tiny_config(**HYBRID)
  c.data.seq_len = 64
  f = _flops(**{f'model__{k}': v for k, v in HYBRID.items()}, data__seq_len=64)
  m, T = c.model, c.data.seq_len
  attention = 4 * m.n_heads * head_dim(m) * (T + 1) / 2  # forward, per token, one layer
  mixers = train_flops.token_mixer_flops(m, T)
  assert mixers == [train_flops.gated_delta_flops_per_token(m)] * 3 + [attention]
  N = train_flops.matmul_params(m)
  assert f.model == pytest.approx((6 * N + 3 * sum(mixers)) * f.tokens)
  assert train_flops.train_flops_per_token(m, T) == pytest.approx(f.model / f.tokens)


def _quiet_tiny(**model):
  c = tiny_config(**model)
  c.mesh.shape.update(data=-1)
  return c


def test_compiles_for_a_tpu_slice_and_reports_per_chip_memory():
  c = _quiet_tiny()
  c.mesh.shape.update(data=1, fsdp=-1)
  result = plan_lib.compile_step(c, targets.parse('v5p-8'))
  assert result.mesh == {'data': 1, 'fsdp': 4, 'tensor': 1, 'context': 1, 'expert': 1}
  # The TPU's decision, not this CPU host's: the Pallas kernel, in a shard_map over the 4 chips.
  assert result.fits and result.attention == 'auto: pallas'
  params = 4 * ModelSpec(c.model).param_count()  # float32
  assert result.params_bytes <= params / 4 * 1.5  # FSDP: each chip holds about a quarter
  assert result.optimizer_bytes == pytest.approx(2 * result.params_bytes, rel=0.05)  # Adam: m, v
  assert result.total_bytes >= result.params_bytes + result.optimizer_bytes
  assert result.trainable == result.total_params


def test_compiles_a_hybrid_model_for_a_tpu_slice():
  c = _quiet_tiny(**HYBRID)
  c.mesh.shape.update(data=1, fsdp=-1)
  result = plan_lib.compile_step(c, targets.parse('v5p-8'))
  assert result.fits and result.trainable == result.total_params == ModelSpec(c.model).param_count()
  assert result.total_bytes >= result.params_bytes + result.optimizer_bytes > 0
  assert result.flops.model == pytest.approx(
      train_flops.train_flops_per_token(c.model, c.data.seq_len) * result.flops.tokens)


def test_compiles_lora_for_an_h100_host():
  c = _quiet_tiny()
  c.model.lora.rank = 4
  c.train.trainable = 'lora'
  result = plan_lib.compile_step(c, targets.parse('h100x8'))
  assert result.fits and result.trainable < result.total_params / 5
  assert result.gradient_bytes < result.params_bytes / 5
  assert 'needs' in result.memory_line and 'per GPU of 79.1: fits' in result.memory_line
  small = dataclasses.replace(result, target=dataclasses.replace(result.target, hbm_bytes=2 ** 10),
                              fits=False)
  with pytest.raises(UserError, match=r'^h100x8: needs \d+\.\d GiB per GPU of 0\.0: does not fit$'):
    plan_lib.fit_or_raise(small)


# docs/plan.md's one-device rows at test size: 32 scanned layers, so that a second copy of the
# layers' weights would outweigh every other temporary.
PAGE_SECTION = '## Larger than one device'
TEST_SIZE = ['--config.model.n_layers=32', '--config.model.d_model=256', '--config.model.n_heads=4',
             '--config.model.n_kv_heads=4', '--config.model.head_dim=64',
             '--config.model.mlp_dim=1024', '--config.model.vocab_size=512',
             '--config.data.seq_len=64']


def _page_plans(section):
  """The arguments of each `lm plan` command in docs/plan.md's `section`."""
  with open(os.path.join(ROOT, 'docs', 'plan.md'), encoding='utf-8') as f:
    text = f.read()
  body = text[text.index(section):]
  body = body[:body.index('\n## ', 1)]
  return [shlex.split(line)[2:] for line in body.split('\n') if line.startswith('lm plan ')]


def test_the_pages_one_device_plans_compile_at_test_size():
  """With full remat the backward layer scan reads each layer's weights from the state in place
  (a layer's slice taken outside its checkpoint was a residual the forward scan stacked: a second
  copy of every layer's weights, 36 GiB of 70B QLoRA's). train.frozen_dtype keeps the frozen base
  in bfloat16; train.offload=host puts the optimizer state in host memory, which the compile-only
  GPU (no memory kinds listed) honours too."""
  argvs = _page_plans(PAGE_SECTION)
  assert len(argvs) == 2
  for argv in argvs:
    cfg, target = _page_config(argv, TEST_SIZE)
    assert cfg.train.offload == 'host' and target.name in ('h100x1', 'h200x1')
    trainer = Trainer(cfg, devices=jax.devices()[:1])
    shapes = trainer.abstract_state.params
    result = plan_lib.compile_step(cfg, target)
    assert result.fits and result.optimizer_on_host
    assert result.host_bytes == result.optimizer_bytes > 0
    assert result.total_bytes < result.params_bytes + result.temporaries_bytes + 1024
    assert f'host memory per GPU: {result.host_bytes / 2 ** 30:.2f} GiB' in result.render()
    if cfg.model.quant.type == 'none':  # the 8B full fine-tune: Adam's two moments per parameter
      assert result.trainable == result.total_params
      assert result.optimizer_bytes == pytest.approx(2 * result.params_bytes, rel=0.01)
      continue
    assert shapes['embed'].dtype == shapes['lm_head.kernel'].dtype == jax.numpy.bfloat16
    assert shapes['layers.attn.q.lora_a'].dtype == jax.numpy.float32  # what trains stays float32
    assert shapes['layers.mlp.up.kernel'].dtype == jax.numpy.uint4
    layer_bytes = sum(shapes[n].size for n in trainer.spec.quantized) // 2  # NF4: two a byte
    frozen_float = sum(2 * s.size for s in shapes.values() if s.dtype == jax.numpy.bfloat16)
    assert result.params_bytes < layer_bytes + frozen_float + 4 * result.trainable + 1024
    # A second copy of the layers' weights adds at least layer_bytes to the temporaries: at this
    # size 17.8 MB with the slice taken inside the checkpoint, 46.2 MB with it taken outside.
    assert result.temporaries_bytes < 1.5 * layer_bytes


def _page_config(argv, test_size):
  parser = argparse.ArgumentParser()
  for flag in ('--config', '--target', '--model-preset'):
    parser.add_argument(flag)
  args, overrides = parser.parse_known_args(argv)
  return config_lib.load_config(args.config, overrides + test_size,
                                model_preset=args.model_preset), targets.parse(args.target)


def test_the_pages_ring_attention_plan_compiles_at_test_size_and_needs_less_than_all_gather():
  """docs/plan.md's 128k-token ring row at 1,024 tokens (one layer of width 256): the same mesh
  (fsdp 2, context 4 on h200x8) with the ring needs less per GPU than gathering K/V, whose
  [T/4, T] attention logits per head are what the page's all_gather row cannot hold."""
  (argv,) = _page_plans('## Ring attention')
  size = ['--config.model.n_layers=1', '--config.model.d_model=256', '--config.model.n_heads=4',
          '--config.model.n_kv_heads=4', '--config.model.head_dim=64', '--config.model.mlp_dim=512',
          '--config.model.vocab_size=512', '--config.model.max_seq_len=1024',
          '--config.data.seq_len=1024']
  cfg, target = _page_config(argv, size)
  assert cfg.model.context_parallel == 'ring' and target.name == 'h200x8'
  ring = plan_lib.compile_step(cfg, target)
  cfg.model.context_parallel = 'all_gather'
  gathered = plan_lib.compile_step(cfg, target)
  assert ring.mesh['context'] == 4 and ring.fits and gathered.fits
  assert ring.temporaries_bytes < gathered.temporaries_bytes
  print(f'ring {ring.temporaries_bytes / 2**20:.1f} MiB, all_gather '
        f'{gathered.temporaries_bytes / 2**20:.1f} MiB of temporaries per GPU')


def test_a_quantized_base_is_counted_at_its_packed_size():
  # QLoRA's NF4 values are uint4: numpy's itemsize says 1 byte, the accelerators pack 2 a byte.
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  tree = {'values': jax.ShapeDtypeStruct((8, 64), jax.numpy.uint4),
          'scale': jax.ShapeDtypeStruct((8, 1), jax.numpy.float32)}
  assert plan_lib._shard_bytes(tree, {'values': one, 'scale': one}) == 8 * 64 // 2 + 8 * 4  # pylint: disable=protected-access


def test_tpu_memory_is_the_compilers_peak_and_elsewhere_the_buffers():
  """libtpu accepts or refuses a step by its peak (docs/pretraining.md: a step whose arguments and
  temporaries came to 109.0 GiB compiled for a 95.7 GiB chip); a GPU allocates the temporaries."""
  m = types.SimpleNamespace(peak_memory_in_bytes=90, argument_size_in_bytes=30, output_size_in_bytes=30,
                            alias_size_in_bytes=30, temp_size_in_bytes=79)
  assert plan_lib.device_bytes(m, 'tpu') == 90
  assert plan_lib.device_bytes(m, 'gpu') == 109
  assert plan_lib.device_bytes(types.SimpleNamespace(**{**vars(m), 'peak_memory_in_bytes': 0}), 'tpu') == 109


@pytest.mark.parametrize('message, needed', [
    ('RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries '
     '(98.92G) exceeds available HBM (95.74G).', int(98.92 * 2 ** 30)),
    ('RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. '
     'Used 99.5G of 95.74G hbm. Exceeded hbm capacity by 3.76G.', int(99.5 * 2 ** 30)),
    ('RESOURCE_EXHAUSTED: out of memory, no figure', -1),
    ('INVALID_ARGUMENT: something else', None)])
def test_an_out_of_memory_compile_says_what_it_needed(message, needed):
  assert plan_lib._out_of_memory(RuntimeError(message)) == needed  # pylint: disable=protected-access


def test_a_mesh_the_target_cannot_hold_names_both():
  c = _quiet_tiny()
  c.mesh.shape.update(data=8)
  with pytest.raises(ConfigError, match=r"^v5p-8 \(4 devices\): mesh.shape=.*needs 8 devices but 4"):
    plan_lib.compile_step(c, targets.parse('v5p-8'))


def test_bad_targets_and_meshes_are_one_line_from_the_command(tmp_path):
  """(The command's success path is the compile above; a second compile would double CI time.)"""
  for args, line in [
      (['--target', 'v9-8'], "lm: error: unknown target 'v9-8'; targets look like v5p-8"),
      (['--target', 'v5p-8', '--config.mesh.shape.data=8'],
       "lm: error: v5p-8 (4 devices): mesh.shape={'context': 1, 'data': 8, 'expert': 1, 'fsdp': 1, 'tensor': 1} needs 8 devices but 4")]:
    out = subprocess.run([lm_runs.PYTHON, '-m', 'lm', 'plan', '--config', 'configs/bench_tiny.py', *args],
                         cwd=ROOT, env=lm_runs.env(str(tmp_path / 'cache')), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].startswith(line), out.stderr[-2000:]


def test_a_search_where_nothing_fits_is_an_error_not_a_report(monkeypatch):
  target = targets.parse('v5p-8')
  monkeypatch.setattr(plan_lib, 'compile_step', lambda c, target, devices=None, *, mfu=0.4:
                      types.SimpleNamespace(fits=False, memory_line='needs 99.0 GiB per chip of 64.0'))
  lines = []
  with pytest.raises(UserError, match='v5p-8: not even 4 sequences of 16 tokens per microbatch fit '
                                      'at any remat policy'):
    for line in plan_lib.search_batches(_quiet_tiny(), target, jax.devices()[:4]):
      lines.append(line)
  assert len(lines) == 5 and all('nothing fits' in l for l in lines[1:])


def test_search_reports_the_largest_microbatch_per_remat_policy(monkeypatch):
  """The search's doubling and its advice, with the compiler replaced by a memory model: a
  sequence costs 4 units without remat, 2 with dots policies, 1 with full remat; 64 fit."""
  cost = {'none': 4, 'dots_no_batch': 2, 'dots': 2, 'full': 1}
  target = targets.parse('v5p-8')

  def fake_compile(c, target, devices=None, *, mfu=0.4):
    del devices, mfu
    need = cost[c.model.remat] * c.data.batch_size
    f = step_flops.StepFlops(1.0, 1.0, 1.0, 0.0, 1.0 if c.model.remat == 'full' else 0.0, 1)
    return types.SimpleNamespace(fits=need <= 64, total_bytes=need * 2 ** 30, flops=f,
                                 memory_line=f'{target.name}: needs {need:.1f} GiB per chip of 64.0')

  monkeypatch.setattr(plan_lib, 'compile_step', fake_compile)
  c = _quiet_tiny()
  c.data.batch_size = 64
  lines = list(plan_lib.search_batches(c, target, jax.devices()[:4]))
  assert '(steps of 4 sequences)' in lines[0]
  assert [int(line.split()[2]) for line in lines[1:5]] == [16, 32, 32, 64]
  assert '+33% FLOPs recomputed' in lines[4]
  assert lines[5] == ('for data.batch_size=64: --config.model.remat=none --config.train.microbatches=4 '
                      '(least recompute that fits)')


def test_a_compiler_failure_is_one_line_naming_the_compiler(monkeypatch):
  # libtpu failed this way on DeepSeek-V3's step for v5p-512 (docs/moe.md): an INTERNAL error from
  # XLA's own passes, which is not lm's nor the config's fault, said as such instead of a traceback.
  def failing_compile(self, *args, **kwargs):
    raise jax.errors.JaxRuntimeError('INTERNAL: during context [post-optimization]: Bitcast '
                                     'cannot have different shape sizes\nmore lines')
  monkeypatch.setattr(jax.stages.Lowered, 'compile', failing_compile)
  with pytest.raises(ConfigError, match=r'^v5e-1: the XLA compiler failed on this step \(INTERNAL: '
                     r'during context \[post-optimization\]: Bitcast cannot have different shape '
                     r'sizes\); the compiler, not the config'):
    plan_lib.compile_step(_quiet_tiny(), targets.parse('v5e-1'))
