"""llama.cpp GGUF in and out: every supported tensor type against transformers' GGUF loader, the
export -> import round trip (F16, Q8_0, LoRA merged), and clear refusals.

No llama.cpp binary is available here: exported files are checked with the gguf package's reader
and by loading them back (into lm, and into transformers)."""

import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import ROOT, random_batch, tiny_config
from lm_runs import save_lora_run

gguf = pytest.importorskip('gguf')

import lm  # noqa: E402
from lm.errors import CheckpointError, ConfigError  # noqa: E402
from lm.io import gguf as gguf_io  # noqa: E402
from lm.io import pretrained  # noqa: E402
from lm.train.loop import Trainer  # noqa: E402

Q = gguf.GGMLQuantizationType


def _byte_level_vocab():
  """The 256 single-byte tokens of a byte-level BPE, in GPT-2's printable spelling."""
  bs = list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1)) + list(
      range(ord('®'), ord('ÿ') + 1))
  cs, n = bs[:], 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return [chr(c) for _, c in sorted(zip(bs, cs))]


def _k_quant_bytes(rng, qtype, rows, cols):
  """Random blocks of a K-quant type (gguf cannot quantize to them) with finite f16 scales."""
  block, size = gguf.GGML_QUANT_SIZES[qtype]
  data = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
  scale = np.full((rows, cols // block), 0.01, np.float16).view(np.uint8).reshape(rows, -1, 2)
  if qtype == Q.Q4_K:  # d, dmin first
    data[:, :, 0:2] = scale
    data[:, :, 2:4] = scale
  else:  # Q6_K: d last
    data[:, :, size - 2:size] = scale
  return data.reshape(rows, -1)


def write_tiny_llama_gguf(path, types):
  """A 1-layer Llama GGUF with D=256 (K-quants need rows of 256), its weights stored in `types`
  (cycled over the 2-D tensors), and a byte-level BPE vocabulary of 256 tokens."""
  rng = np.random.default_rng(0)
  D, H, KV, F, V = 256, 4, 2, 256, 256
  w = gguf.GGUFWriter(str(path), 'llama')
  w.add_context_length(64)
  w.add_embedding_length(D)
  w.add_block_count(1)
  w.add_feed_forward_length(F)
  w.add_head_count(H)
  w.add_head_count_kv(KV)
  w.add_rope_freq_base(10000.0)
  w.add_layer_norm_rms_eps(1e-5)
  w.add_vocab_size(V)
  w.add_tokenizer_model('gpt2')
  w.add_tokenizer_pre('default')
  w.add_token_list(_byte_level_vocab())
  w.add_token_types([1] * V)
  w.add_token_merges([])
  w.add_eos_token_id(0)
  shapes = {'token_embd.weight': (V, D), 'output.weight': (V, D),
            'blk.0.attn_q.weight': (D, D), 'blk.0.attn_k.weight': (KV * D // H, D),
            'blk.0.attn_v.weight': (KV * D // H, D), 'blk.0.attn_output.weight': (D, D),
            'blk.0.ffn_gate.weight': (F, D), 'blk.0.ffn_up.weight': (F, D),
            'blk.0.ffn_down.weight': (D, F)}
  for k, (name, shape) in enumerate(shapes.items()):
    qtype = types[k % len(types)]
    array = (0.05 * rng.standard_normal(shape)).astype(np.float32)
    if qtype in (Q.Q4_K, Q.Q6_K):
      w.add_tensor(name, _k_quant_bytes(rng, qtype, *shape), raw_dtype=qtype)
    elif qtype == Q.F32:
      w.add_tensor(name, array)
    elif qtype == Q.F16:
      w.add_tensor(name, array.astype(np.float16))
    else:
      w.add_tensor(name, gguf.quantize(array, qtype), raw_dtype=qtype)
  for name in ('blk.0.attn_norm.weight', 'blk.0.ffn_norm.weight', 'output_norm.weight'):
    w.add_tensor(name, (1 + 0.1 * rng.standard_normal(D)).astype(np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)


def lm_logits(model, tokens):
  return np.asarray(jax.jit(lambda p: model.spec.bind(p)(tokens))(model.params))


def test_every_supported_tensor_type_loads_as_transformers_reads_it(tmp_path):
  """F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K: lm's logits equal transformers' on the same
  GGUF file (transformers dequantizes with the same gguf package and undoes llama.cpp's q/k
  permutation its own way), so names, layouts and the permutation are right."""
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  types = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K]
  file = write_tiny_llama_gguf(tmp_path / 'tiny.gguf', types)
  stored = {t.tensor_type for t in gguf.GGUFReader(file).tensors}
  assert set(types) <= stored
  model = lm.load_model(file)
  assert (model.cfg.model.d_model, model.cfg.model.n_kv_heads, model.cfg.model.tie_embeddings) == (
      256, 2, False)
  tokens = np.random.default_rng(1).integers(0, 256, (2, 12)).astype(np.int32)
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path), gguf_file='tiny.gguf', dtype=torch.float32).eval()
  with torch.no_grad():
    expected = hf_model(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
  assert np.max(np.abs(lm_logits(model, tokens) - expected)) <= 1e-4


def test_permutation_is_llama_cpps_and_its_inverse():
  w = np.arange(2 * 8 * 3).reshape(2 * 8, 3)  # 2 heads of head_dim 8, 3 inputs
  permuted = gguf_io.permute_rows(w, 2, inverse=False)
  # llama.cpp: each head's rows (first half, second half) interleaved as pairs.
  assert permuted[:8, 0].tolist() == [0, 12, 3, 15, 6, 18, 9, 21]
  np.testing.assert_array_equal(gguf_io.permute_rows(permuted, 2, inverse=True), w)


@pytest.fixture(scope='module')
def lora_run(tmp_path_factory):
  """An lm LoRA run (adapters perturbed so merging matters) with a SentencePiece tokenizer and the
  logits its merged model computes."""
  from lm.data import tokenizer as tokenizer_lib
  import pydoc_data.topics
  tmp = tmp_path_factory.mktemp('gguf_run')
  run = tmp / 'run'
  docs = [t.lower() for t in pydoc_data.topics.topics.values()]
  tokenizer_lib.train_tokenizer(docs, str(tmp / 'sp.model'), 128, byte_fallback=False)
  c = tiny_config()
  c.model.lora.update(rank=4, alpha=8.0, targets=r'attn\.(q|k|v)|mlp')
  c.train.trainable = 'lora'
  c.data.tokenizer = str(tmp / 'sp.model')
  source, params = save_lora_run(run, c)
  tokens = random_batch(c)['tokens']
  expected = np.asarray(jax.jit(lambda p: source.spec.bind(p)(tokens))(params))
  return run, tokens, expected


@pytest.mark.parametrize('dtype', ['f16', 'q8_0'])
def test_export_then_import_gives_the_same_logits(lora_run, tmp_path, dtype):
  run, tokens, expected = lora_run
  out = tmp_path / 'model.gguf'
  line = pretrained.export_run(str(run), str(out), fmt='gguf', dtype=dtype)
  assert 'LoRA adapters merged' in line and os.listdir(tmp_path) == ['model.gguf']
  reader = gguf.GGUFReader(str(out))
  meta = {k: f.contents() for k, f in reader.fields.items()}
  assert meta['general.architecture'] == 'llama'
  assert (meta['llama.block_count'], meta['llama.embedding_length'], meta['llama.attention.head_count'],
          meta['llama.attention.head_count_kv'], meta['llama.feed_forward_length']) == (2, 32, 4, 2, 64)
  assert meta['tokenizer.ggml.model'] == 'llama' and len(meta['tokenizer.ggml.tokens']) == 128
  types = {t.name: t.tensor_type for t in reader.tensors}
  assert types['blk.0.attn_q.weight'] == (Q.F16 if dtype == 'f16' else Q.Q8_0)
  assert types['blk.0.attn_norm.weight'] == Q.F32
  model = lm.load_model(str(out))
  got = lm_logits(model, tokens)
  scale = np.max(np.abs(expected))
  # F16 keeps 11 significant bits (relative error <= 2^-11 per weight); Q8_0 rounds each weight
  # to 1/254 of its block's largest magnitude. Measured: F16 ~1e-3, Q8_0 ~1e-2 of the logit scale.
  bound = {'f16': 5e-3, 'q8_0': 5e-2}[dtype]
  assert np.max(np.abs(got - expected)) <= bound * scale
  assert (np.argmax(got, -1) == np.argmax(expected, -1)).mean() >= 0.9
  # The embedded SentencePiece vocabulary is the run's.
  text = 'the quick brown fox'
  from lm.data import tokenizer as tokenizer_lib
  assert model.tokenizer.encode(text) == tokenizer_lib.load(str(run.parent / 'sp.model')).encode(text)


def test_init_from_a_gguf_file_and_its_directory(lora_run, tmp_path):
  run, tokens, expected = lora_run
  pretrained.export_run(str(run), str(tmp_path / 'model.gguf'), fmt='gguf', dtype='f16')
  for source in (tmp_path / 'model.gguf', tmp_path):
    c = tiny_config(d_model=64)
    c.train.update(init_from=str(source), trainable='lora')
    c.model.lora.update(rank=2, alpha=4.0)
    trainer = Trainer(c, devices=jax.devices()[:1])
    assert c.model.d_model == 32 and c.data.tokenizer == str(tmp_path / 'model.gguf')
    state = trainer.init_state()
    got = np.asarray(jax.jit(lambda p: trainer.spec.bind(p)(tokens))(state.params))
    assert np.max(np.abs(got - expected)) <= 5e-3 * np.max(np.abs(expected))


def test_unsupported_tensor_type_and_architecture_are_one_line_errors(tmp_path):
  file = write_tiny_llama_gguf(tmp_path / 'q5.gguf', [Q.Q5_0])
  with pytest.raises(CheckpointError, match=r'tensor token_embd\.weight has GGUF type Q5_0.*supported: '
                     r'F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K'):
    lm.load_model(file)
  w = gguf.GGUFWriter(str(tmp_path / 'phi.gguf'), 'phi2')
  w.add_tensor('token_embd.weight', np.zeros((4, 4), np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(CheckpointError, match="architecture 'phi2' is not supported; lm imports llama, qwen2"):
    lm.load_model(str(tmp_path / 'phi.gguf'))
  os.remove(file)
  with pytest.raises(ConfigError, match='holds 2 .gguf files|neither'):
    (tmp_path / 'b.gguf').write_bytes(b'')
    pretrained.kind(str(tmp_path))
  # The CLI: one line, exit 2.
  out = subprocess.run([sys.executable, '-m', 'lm', 'generate', str(tmp_path / 'phi.gguf'),
                        '--prompt', 'x'], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, 'PYTHONPATH': ROOT, 'JAX_PLATFORMS': 'cpu'})
  assert out.returncode == 2
  assert out.stderr.strip().splitlines()[-1].startswith("lm: error: ") and 'phi2' in out.stderr


def test_export_refusals_write_nothing(lora_run, tmp_path):
  run, _, _ = lora_run
  with pytest.raises(ConfigError, match='not a GGUF export type; choose f16 or q8_0'):
    pretrained.export_run(str(run), str(tmp_path / 'x.gguf'), fmt='gguf', dtype='q4_0')
  gemma = tiny_config(norm_offset=1.0, embed_scale=True, mlp_activation='gelu_tanh',
                      tie_embeddings=True).model
  with pytest.raises(CheckpointError, match='GGUF export writes llama, qwen2, qwen3, mixtral, qwen3_moe, '
                     'gemma2, gemma3_text, phi3, smollm3, olmo2, olmo3, gpt_oss, deepseek_v3, glm4_moe, '
                     'llama4_text, qwen3_5_text, qwen3_5_moe_text, qwen3_next, gemma4_text models'
                     '.*this model is gemma$'):
    gguf_io.save(str(tmp_path / 'x.gguf'), {}, gemma, None)
  # What llama.cpp's newer graphs fix in code, named with the field that differs.
  olmo = dict(norm_placement='post', qk_norm=True, qk_norm_scope='all')
  for model, rule in [
      (dict(hf_family='smollm3', n_layers=4, rope_layers=(1, 0, 1, 0)),
       r'skips RoPE on every 4th layer .* model.rope_layers=\(1, 0, 1, 0\)'),
      (dict(olmo, hf_family='olmo3', sliding_window=4, rope_local_theta=1e5, layer_types=('sliding', 'full')),
       r"rotates sliding layers at the full layers' base .* model.rope_local_theta=100000.0"),
      (dict(olmo, hf_family='olmo2', head_dim=16), r'heads of d_model / n_heads.* model.head_dim=16'),
      (dict(hf_family='gpt_oss', qkv_bias=True, attn_out_bias=True, attn_sinks=True, sliding_window=4,
            layer_types=('sliding', 'full'),
            moe=dict(n_experts=4, experts_per_token=2, router='topk_softmax', router_bias=True,
                     expert_bias=True, swiglu_limit=1.0)),
       r"clamps the experts' SwiGLU at 7.0, but this model has model.moe.swiglu_limit=1.0"),
      (dict(hf_family='llama4_text', n_layers=4, rope_interleaved=True, rope_layers=(1, 1, 1, 0),
            layer_types=('chunked',) * 3 + ('full',), attention_chunk_size=4, qk_l2_norm=True,
            moe=dict(n_experts=4, experts_per_token=1, router='topk_sigmoid', shared_dim=64)),
       r'within chunks of 8192 positions \(fixed in code\), but this model has '
       r'model.attention_chunk_size=4')]:
    c = tiny_config()
    c.model.moe.update(model.pop('moe', {}))
    c.model.update(model)
    with pytest.raises(CheckpointError, match=rule):
      gguf_io.save(str(tmp_path / 'x.gguf'), {}, c.model, None)
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('family, arch, model', [
    ('smollm3', 'smollm3', dict(n_layers=4, rope_layers=(1, 1, 1, 0), tie_embeddings=True)),
    ('olmo3', 'olmo2', dict(norm_placement='post', qk_norm=True, qk_norm_scope='all', n_layers=4,
                            sliding_window=4, layer_types=('sliding', 'full', 'sliding', 'sliding'),
                            tie_embeddings=True))])
def test_newer_families_export_as_llama_cpps_and_read_back(lora_run, tmp_path, family, arch, model):
  """SmolLM3 (NoPE every 4th layer, interleaved RoPE: q/k permuted) and OLMo 3 (olmo2's graph with
  a per-layer window pattern; norms after each part; tied embeddings written again as output.weight,
  which olmo2 requires): llama.cpp's tensor names, and lm's import gives back the model's fields and
  its F16-rounded weights. tests/io/test_llama_cpp.py runs the files in llama.cpp."""
  from lm.data import tokenizer as tokenizer_lib
  from lm.train.state import ModelSpec
  run, _, _ = lora_run
  tokenizer = tokenizer_lib.load(str(run.parent / 'sp.model'))
  c = tiny_config(hf_family=family, **model)
  spec = ModelSpec(c.model)
  rng = np.random.default_rng(0)
  params = {n: rng.normal(size=s.shape).astype(np.float16).astype(np.float32)
            for n, s in spec.shapes.items()}
  out = tmp_path / f'{family}.gguf'
  assert gguf_io.save(str(out), params, c.model, tokenizer) == arch
  assert _kinds(out) <= _gguf_names(arch)
  fields = gguf_io.model_config(str(out))
  assert fields['hf_family'] == family and fields['tie_embeddings'] == (arch == 'smollm3')
  for key in ('rope_layers', 'layer_types'):
    assert tuple(fields.get(key, ())) == tuple(c.model[key]), key
  for key in ('norm_placement', 'qk_norm_scope', 'sliding_window', 'rope_theta'):
    assert fields.get(key, 'pre' if key == 'norm_placement' else c.model[key]) == c.model[key], key
  c.model.update(fields)
  back = ModelSpec(c.model)
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  loaded = gguf_io.load_params(str(out), back, {n: one for n in back.names})
  for name, value in params.items():
    np.testing.assert_array_equal(np.asarray(loaded[name]), value, err_msg=name)
  if arch == 'olmo2':
    np.testing.assert_array_equal(np.asarray(loaded['lm_head.kernel']), params['embed'].T)


def test_quant_bench_reads_a_gguf_file(tmp_path, monkeypatch):
  """`python -m lm.bench.quant` on a GGUF file: int8 stays close to the float logits, NF4 is
  coarser, and every real (unpadded) token is counted."""
  from lm.bench import quant as quant_bench
  from lm.eval import task_data
  file = write_tiny_llama_gguf(tmp_path / 'tiny.gguf', [Q.F32])
  rows = [{'question': f'What is {i} + {i}?', 'answer': f'{i} + {i} = {2 * i}\n#### {2 * i}'}
          for i in range(3)]
  monkeypatch.setattr(task_data, 'gsm8k', lambda split: rows)
  int8, nf4 = quant_bench.compare(file, rows=3, length=16, settings=(('int8', 64), ('nf4', 64)))
  assert int8['tokens'] == nf4['tokens'] == 3 * 16  # each row is longer than 16 byte tokens
  assert int8['mean_abs_dlogit'] < nf4['mean_abs_dlogit'] < 0.5 * nf4['mean_abs_logit']
  assert int8['top1_agreement'] >= nf4['top1_agreement'] > 0.5
  assert int8['quantized_mb'] < int8['float_mb'] / 3 and nf4['quantized_mb'] < int8['quantized_mb']


def _gguf_names(arch: str) -> set:
  """The tensor names llama.cpp's architecture `arch` has (the gguf package's table)."""
  kind = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
  return {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[kind]}


def _kinds(path) -> set:
  return {re.sub(r'blk\.\d+\.', 'blk.{bid}.', t.name).rsplit('.', 1)[0]
          for t in gguf.GGUFReader(str(path)).tensors}


def test_qwen3_exports_as_llama_cpps_qwen3_and_reads_back(tmp_path):
  """Qwen3 (q/k RMSNorm, rotate-half RoPE, a head wider than d_model / n_heads): every tensor is
  one that llama.cpp's qwen3 architecture names, and the file gives back the run's logits."""
  from lm.data import tokenizer as tokenizer_lib
  import pydoc_data.topics
  docs = [t.lower() for t in pydoc_data.topics.topics.values()]
  tokenizer_lib.train_tokenizer(docs, str(tmp_path / 'sp.model'), 128, byte_fallback=False)
  c = tiny_config()
  c.model.update(qk_norm=True, hf_family='qwen3', head_dim=16)
  c.model.lora.update(rank=4, alpha=8.0, targets=r'attn\.(q|k|v)|mlp')
  c.train.trainable = 'lora'
  c.data.tokenizer = str(tmp_path / 'sp.model')
  source, params = save_lora_run(tmp_path / 'run', c)
  tokens = random_batch(c)['tokens']
  expected = np.asarray(jax.jit(lambda p: source.spec.bind(p)(tokens))(params))
  out = tmp_path / 'qwen3.gguf'
  pretrained.export_run(str(tmp_path / 'run'), str(out), fmt='gguf', dtype='f16')
  meta = {k: f.contents() for k, f in gguf.GGUFReader(str(out)).fields.items()}
  assert meta['general.architecture'] == 'qwen3' and meta['qwen3.attention.key_length'] == 16
  assert {'blk.{bid}.attn_q_norm', 'blk.{bid}.attn_k_norm'} <= _kinds(out) <= _gguf_names('qwen3')
  model = lm.load_model(str(out))
  assert model.cfg.model.qk_norm and model.cfg.model.hf_family == 'qwen3'
  got = lm_logits(model, tokens)
  assert np.max(np.abs(got - expected)) <= 5e-3 * np.max(np.abs(expected))


def test_every_exported_llama_tensor_is_one_llama_cpp_names(lora_run, tmp_path):
  run, _, _ = lora_run
  pretrained.export_run(str(run), str(tmp_path / 'm.gguf'), fmt='gguf')
  assert _kinds(tmp_path / 'm.gguf') <= _gguf_names('llama')


@pytest.mark.parametrize('family, arch', [('mixtral', 'llama'), ('qwen3_moe', 'qwen3moe')])
def test_moe_exports_experts_as_llama_cpp_stacks_them_and_reads_back(tmp_path, family, arch):
  """Mixtral (llama.cpp's llama graph with experts) and Qwen3-MoE: each layer's experts are one
  [n_expert, out, in] tensor (ffn_*_exps), the router ffn_gate_inp, and the file reads back to the
  same model (the same logits)."""
  from lm.data import tokenizer as tokenizer_lib
  from lm.train.state import ModelSpec
  import pydoc_data.topics
  docs = [t.lower() for t in pydoc_data.topics.topics.values()]
  tok = tokenizer_lib.train_tokenizer(docs, str(tmp_path / 'sp.model'), 128, byte_fallback=False)
  c = tiny_config(qk_norm=family == 'qwen3_moe')
  c.model.moe.update(n_experts=4, experts_per_token=2, expert_dim=16, norm_topk_prob=True)
  spec = ModelSpec(c.model)
  params = jax.jit(spec.init)(jax.random.key(0))
  # The weights as F16 stores them (norms stay F32): a router's near-tie can otherwise pick
  # other experts after rounding, which says nothing about the layout.
  params = {k: v if k.endswith(('scale', 'bias')) else v.astype(np.float16).astype(np.float32)
            for k, v in params.items()}
  tokens = random_batch(c)['tokens']
  expected = np.asarray(jax.jit(lambda p: spec.bind(p)(tokens))(params))
  out = tmp_path / f'{family}.gguf'
  assert gguf_io.save(str(out), params, c.model, tok) == arch
  reader = gguf.GGUFReader(str(out))
  meta = {k: f.contents() for k, f in reader.fields.items()}
  assert (meta[f'{arch}.expert_count'], meta[f'{arch}.expert_used_count']) == (4, 2)
  shapes = {t.name: tuple(int(n) for n in reversed(t.shape)) for t in reader.tensors}
  assert shapes['blk.0.ffn_gate_exps.weight'] == (4, 16, 32)  # [n_expert, out, in]
  assert shapes['blk.1.ffn_down_exps.weight'] == (4, 32, 16) and shapes['blk.0.ffn_gate_inp.weight'] == (4, 32)
  assert _kinds(out) <= _gguf_names(arch)
  model = lm.load_model(str(out))
  assert model.cfg.model.moe.n_experts == 4 and model.cfg.model.hf_family == family
  got = lm_logits(model, tokens)
  assert np.max(np.abs(got - expected)) <= 1e-4 * np.max(np.abs(expected))


def test_moe_without_renormalised_weights_is_refused(tmp_path):
  c = tiny_config(qk_norm=True)
  c.model.moe.update(n_experts=4, experts_per_token=2, expert_dim=16, norm_topk_prob=False)
  with pytest.raises(CheckpointError, match="llama.cpp's qwen3moe graph renormalises the chosen experts"):
    gguf_io.save(str(tmp_path / 'x.gguf'), {}, c.model, None)
  assert os.listdir(tmp_path) == []


# Tiny Gemma 2, Gemma 3 and Phi-3 models: lm family -> (llama.cpp architecture, model overrides).
# Enough layers that llama.cpp's default sliding pattern shows (Gemma 3: layer 5 is the full one)
# and a window (4) shorter than the batch (16 tokens). transformers' GGUF reader takes the head
# size, window and full-layer RoPE base from the file but not the softcaps, the query scale or
# Gemma 3's sliding-layer base (its integrations/ggml.py maps no key to them): it keeps
# Gemma2Config's and Gemma3TextConfig's defaults (50 and 30, 256, 10000), so these models use
# those values, and their head size is 256 so that llama.cpp's scale (head_dim ** -0.5) is the same.
GEMMA = dict(norm_offset=1.0, embed_scale=True, mlp_activation='gelu_tanh',
             norm_placement='sandwich', head_dim=256, query_pre_attn_scalar=256.0, sliding_window=4)
NEW_FAMILIES = {
    'gemma2': ('gemma2', dict(GEMMA, hf_family='gemma2', n_layers=3, tie_embeddings=True,
                              attn_logit_softcap=50.0, final_logit_softcap=30.0,
                              layer_types=('sliding', 'full', 'sliding'))),
    'gemma3_text': ('gemma3', dict(GEMMA, hf_family='gemma3_text', n_layers=7, qk_norm=True,
                                   tie_embeddings=False, rope_theta=1e6, rope_local_theta=1e4,
                                   layer_types=('sliding',) * 5 + ('full', 'sliding'))),
    'phi3': ('phi3', dict(hf_family='phi3', tie_embeddings=False)),
}
# Model fields that a file must give back.
ROUND_TRIP_FIELDS = ('n_layers', 'n_heads', 'n_kv_heads', 'head_dim', 'mlp_dim', 'tie_embeddings',
                     'norm_offset', 'embed_scale', 'mlp_activation', 'norm_placement', 'qk_norm',
                     'layer_types', 'sliding_window', 'query_pre_attn_scalar', 'attn_logit_softcap',
                     'final_logit_softcap', 'rope_theta', 'rope_local_theta', 'rope_scaling',
                     'hf_family')


def _f16_model(overrides, seed=0):
  """(config, spec, parameters) of a tiny model whose weights are as F16 stores them (norms stay
  F32, perturbed so that Gemma's stored 1 + w is not all ones)."""
  from lm.train.state import ModelSpec
  c = tiny_config(**overrides)
  spec = ModelSpec(c.model)
  rng = np.random.default_rng(seed)
  params = {k: (v + 0.1 * rng.standard_normal(v.shape).astype(np.float32)) if k.endswith('scale')
            else v.astype(np.float16).astype(np.float32)
            for k, v in jax.jit(spec.init)(jax.random.key(seed)).items()}
  return c, spec, params


@pytest.fixture(scope='module')
def sp_tokenizer(tmp_path_factory):
  from lm.data import tokenizer as tokenizer_lib
  import pydoc_data.topics
  docs = [t.lower() for t in pydoc_data.topics.topics.values()]
  path = tmp_path_factory.mktemp('sp') / 'sp.model'
  return tokenizer_lib.train_tokenizer(docs, str(path), 128, byte_fallback=False)


def _arch_keys() -> set:
  """Every `{arch}.*` metadata key the gguf package names (gguf.Keys), as templates."""
  return {v for group in vars(gguf.Keys).values() if isinstance(group, type)
          for v in vars(group).values() if isinstance(v, str) and v.startswith('{arch}.')}


@pytest.mark.parametrize('family', list(NEW_FAMILIES))
def test_gemma_and_phi3_export_as_llama_cpp_names_them_and_read_back_in_lm_and_transformers(
    tmp_path, sp_tokenizer, family):
  """Gemma 2 (softcaps, alternating sliding layers, sandwich norms stored as 1 + w, tied output),
  Gemma 3 (q/k norms, five sliding layers to one full, two RoPE bases, an output projection) and
  Phi-3 (fused attn_qkv and gate/up ffn_up): the F16 file has only the names and keys llama.cpp's
  architecture has, lm reads back the same model (its config and logits), and transformers' own
  GGUF loader, which implements llama.cpp's conventions independently, computes the same logits."""
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  arch, overrides = NEW_FAMILIES[family]
  c, spec, params = _f16_model(overrides)
  tokens = random_batch(c)['tokens']
  expected = np.asarray(jax.jit(lambda p: spec.bind(p)(tokens))(params))
  out = tmp_path / f'{arch}.gguf'
  assert gguf_io.save(str(out), params, c.model, sp_tokenizer) == arch
  reader = gguf.GGUFReader(str(out))
  meta = {k: f.contents() for k, f in reader.fields.items()}
  assert meta['general.architecture'] == arch
  own = {k.replace(arch, '{arch}', 1) for k in meta if k.startswith(arch + '.')}
  assert own <= _arch_keys()
  assert all(k.startswith(('GGUF.', 'general.', 'tokenizer.', arch + '.')) for k in meta)
  assert _kinds(out) <= _gguf_names(arch)
  shapes = {t.name: tuple(int(n) for n in reversed(t.shape)) for t in reader.tensors}
  if arch == 'gemma2':
    assert (meta['gemma2.attn_logit_softcapping'], meta['gemma2.final_logit_softcapping'],
            meta['gemma2.attention.sliding_window'], meta['gemma2.attention.key_length']) == (50, 30, 4, 256)
    assert 'output.weight' not in shapes and 'blk.2.post_ffw_norm.weight' in shapes
  elif arch == 'gemma3':
    assert (meta['gemma3.rope.freq_base'], meta['gemma3.rope.freq_base_swa'],
            meta['gemma3.attention.sliding_window']) == (1e6, 1e4, 4)
    assert 'gemma3.attn_logit_softcapping' not in meta and 'blk.6.attn_q_norm.weight' in shapes
    assert 'output.weight' in shapes
  else:  # Phi-3's fused rows: q (4 heads of 8), k and v (2 heads each); gate and up (64 each)
    assert shapes['blk.0.attn_qkv.weight'] == (64, 32) and shapes['blk.1.ffn_up.weight'] == (128, 32)
    assert (meta['phi3.rope.scaling.original_context_length'], meta['phi3.attention.sliding_window']) == (64, 0)
  # Gemma's norms are stored as llama.cpp multiplies by them: 1 + w.
  norm = 'blk.0.attn_norm.weight'
  stored = next(t for t in reader.tensors if t.name == norm).data
  offset = 1.0 if arch.startswith('gemma') else 0.0
  np.testing.assert_allclose(stored, np.asarray(params['layers.attn_norm.scale'][0]) + offset, rtol=1e-6)

  model = lm.load_model(str(out))
  got = lm_logits(model, tokens)
  assert {f: model.cfg.model[f] for f in ROUND_TRIP_FIELDS} == {f: c.model[f] for f in ROUND_TRIP_FIELDS}
  scale = np.max(np.abs(expected))
  assert np.max(np.abs(got - expected)) <= 1e-4 * scale

  hf_model = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path), gguf_file=out.name, dtype=torch.float32).eval()
  assert hf_model.config.model_type == family
  with torch.no_grad():
    theirs = hf_model(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
  assert np.max(np.abs(theirs - expected)) <= 1e-4 * scale


def test_gemma3_linear_rope_scaling_of_full_layers_reads_back(tmp_path, sp_tokenizer):
  """Gemma 3's 4B-27B checkpoints scale RoPE linearly on full layers only: written as
  rope.scaling.type / factor (llama.cpp leaves sliding layers at rope.freq_base_swa, unscaled),
  it reads back to the same logits. (transformers' GGUF reader ignores the scaling keys.)"""
  _, overrides = NEW_FAMILIES['gemma3_text']
  c, spec, params = _f16_model(dict(overrides, rope_scaling=dict(type='linear', factor=8.0)))
  tokens = random_batch(c)['tokens']
  expected = np.asarray(jax.jit(lambda p: spec.bind(p)(tokens))(params))
  out = tmp_path / 'gemma3.gguf'
  gguf_io.save(str(out), params, c.model, sp_tokenizer)
  meta = {k: f.contents() for k, f in gguf.GGUFReader(str(out)).fields.items()}
  assert (meta['gemma3.rope.scaling.type'], meta['gemma3.rope.scaling.factor']) == ('linear', 8.0)
  model = lm.load_model(str(out))
  assert dict(model.cfg.model.rope_scaling) == dict(type='linear', factor=8.0)
  assert model.cfg.model.rope_local_theta == 1e4
  got = lm_logits(model, tokens)
  assert np.max(np.abs(got - expected)) <= 1e-4 * np.max(np.abs(expected))


# What llama.cpp's Gemma 2/3 and Phi-3 graphs cannot compute (lm/io/gguf.py EXPORT_LIMITS):
# (family, changes to its tiny model, the refusal).
REFUSED = [
    ('gemma2', dict(tie_embeddings=False), 'projects the output with the embeddings'),
    ('gemma2', dict(attn_logit_softcap=0.0), 'always soft-caps attention logits'),
    ('gemma2', dict(final_logit_softcap=0.0), 'always soft-caps the output logits'),
    ('gemma2', dict(layer_types=('full', 'sliding', 'full')), 'alternates sliding and full layers'),
    ('gemma2', dict(qkv_bias=True, attn_out_bias=True), 'gemma2 graph has no attention biases'),
    ('gemma2', dict(query_pre_attn_scalar=144.0),
     r'scales queries by head_dim \*\* -0\.5 .*at 46 layers.*here 256 \*\* -0\.5.*'
     r'model\.query_pre_attn_scalar=144\.0; export it with --format hf'),
    ('gemma3_text', dict(layer_types=('full',) + ('sliding',) * 6), 'every sixth layer full'),
    ('gemma3_text', dict(rope_scaling=dict(type='yarn', factor=4.0, original_max_seq_len=16)),
     'scales RoPE linearly and on full layers only'),
    ('gemma3_text', dict(rope_scaling=dict(type='linear', factor=8.0), rope_local_theta=0.0),
     'scales RoPE linearly and on full layers only'),
    ('phi3', dict(sliding_window=8), r'ignores it .*model\.sliding_window=8;'),
    ('phi3', dict(head_dim=16), 'has heads of d_model / n_heads'),
    ('mixtral', dict(moe=dict(n_experts=4, experts_per_token=2, expert_dim=16, norm_topk_prob=True),
                     sliding_window=8), "llama.cpp's llama graph has no sliding window"),
    ('qwen3_5_text', dict(qkv_bias=True, attn_out_bias=True), 'qwen35 graph has no attention biases'),
    ('qwen3_5_text', dict(layer_types=('linear',) * 4), 'needs DeltaNet and full-attention layers both'),
    ('qwen3_5_text', dict(linear_attn=dict(value_head_dim=16)),
     r'one head size .*model\.linear_attn\.value_head_dim=16'),
    ('qwen3_5_text', dict(rope_scaling=dict(type='linear', factor=2.0)), 'qwen35 files with plain RoPE'),
    ('qwen3_5_moe_text', dict(moe=dict(norm_topk_prob=False)), "renormalises the chosen experts' weights"),
    ('qwen3_next', dict(moe=dict(shared_dim=0, shared_gate=False)), 'requires the gated shared expert'),
    ('qwen3_next', dict(mlp_types=('dense', 'moe', 'moe', 'moe')), 'requires experts in every layer'),
    ('gemma4_text', dict(kv_shared_layers=3, mlp_types=('dense',) * 3 + ('wide',) * 3),
     r'KV-shared layers reuse .*model\.kv_shared_layers=3'),
    ('gemma4_text', dict(rope_scaling=dict(type='yarn', factor=4.0, original_max_seq_len=16)),
     'holds proportional or linear scaling'),
    ('gemma4_text', dict(rope_local_theta=0.0), 'a scaled model needs model.rope_local_theta'),
    ('gemma4_text', dict(per_layer_input_vocab=64), 'for every token of the vocabulary'),
    ('gemma4_text', dict(layer_types=('full',) * 6), 'needs sliding-window layers'),
    ('gemma4_text', dict(qkv_bias=True, attn_out_bias=True), 'gemma4 graph has no attention biases'),
]


@pytest.mark.parametrize('family, changes, message', REFUSED,
                         ids=[f'{f}-{"-".join(c)}' for f, c, _ in REFUSED])
def test_what_llama_cpp_cannot_compute_is_refused_before_writing(tmp_path, family, changes, message):
  known = {**NEW_FAMILIES, **EXPORT_ONLY}
  overrides = dict(known[family][1]) if family in known else dict(hf_family=family)
  nested = {k: {**overrides.get(k, {}), **changes.get(k, {})} for k in ('moe', 'linear_attn')}
  c = _tiny({**overrides, **changes, **nested})
  with pytest.raises(CheckpointError, match=message) as raised:
    gguf_io.save(str(tmp_path / 'x.gguf'), {}, c.model, None)
  assert '\n' not in str(raised.value) and str(raised.value).startswith('GGUF export: ')
  assert os.listdir(tmp_path) == []


def test_phi3_long_rope_files_are_refused_on_import(tmp_path):
  """Phi-3 128k files carry rope_factors_long / _short (LongRoPE), which lm does not implement."""
  w = gguf.GGUFWriter(str(tmp_path / 'long.gguf'), 'phi3')
  for key, value in (('embedding_length', 32), ('attention.head_count', 4), ('block_count', 1),
                     ('feed_forward_length', 64), ('attention.layer_norm_rms_epsilon', 1e-5)):
    (w.add_float32 if isinstance(value, float) else w.add_uint32)(f'phi3.{key}', value)
  w.add_tensor('token_embd.weight', np.zeros((8, 32), np.float32))
  w.add_tensor('rope_factors_long.weight', np.ones(4, np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(CheckpointError, match=r'RoPE scaling \(rope_factors_long\.weight\) is not supported'):
    gguf_io.model_config(str(tmp_path / 'long.gguf'))


# The families lm exports but does not import from GGUF: Qwen3.5's hybrid stack (DeltaNet layers
# with 2 key heads and 4 value heads, a gated full attention layer with RoPE on half of each head),
# with Qwen3-Next's experts (Qwen3.5-MoE, Qwen3-Next), and Gemma 4 text: as E2B (per-layer inputs,
# two KV-shared layers with MLPs twice as wide) and as 31B (full layers' values their keys, 1 KV
# head). lm family or label -> (llama.cpp architecture, tiny model).
QWEN35 = dict(n_layers=4, head_dim=16, partial_rotary_factor=0.5, norm_offset=1.0, qk_norm=True,
              attn_output_gate=True, layer_types=('linear', 'linear', 'linear', 'full'),
              linear_attn=dict(n_key_heads=2, n_value_heads=4, key_head_dim=8, value_head_dim=8))
QWEN_MOE = dict(n_experts=4, experts_per_token=2, expert_dim=16, router='softmax',
                norm_topk_prob=True, shared_dim=24, shared_gate=True)
GEMMA4 = dict(hf_family='gemma4_text', head_dim=16, global_head_dim=32, mlp_activation='gelu_tanh',
              norm_offset=0.0, embed_scale=True, norm_placement='sandwich', qk_norm=True,
              v_norm=True, query_pre_attn_scalar=1.0, layer_scale=True, sliding_window=4,
              rope_theta=1e6, rope_local_theta=1e4,
              rope_scaling=dict(type='proportional', factor=1.0, partial_rotary_factor=0.25))
EXPORT_ONLY = {
    'qwen3_5_text': ('qwen35', dict(QWEN35, hf_family='qwen3_5_text')),
    'qwen3_5_moe_text': ('qwen35moe', dict(QWEN35, hf_family='qwen3_5_moe_text', moe=QWEN_MOE)),
    'qwen3_next': ('qwen3next', dict(QWEN35, hf_family='qwen3_next', moe=QWEN_MOE)),
    'gemma4_text': ('gemma4', dict(GEMMA4, n_layers=6, layer_types=('sliding', 'full') * 3,
                                   kv_shared_layers=2, per_layer_input_dim=8, tie_embeddings=True,
                                   mlp_types=('dense',) * 4 + ('wide',) * 2, wide_mlp_dim=128,
                                   final_logit_softcap=3.0)),
    'gemma4_text_k_eq_v': ('gemma4', dict(GEMMA4, n_layers=4, layer_types=('sliding', 'full') * 2,
                                          attn_k_eq_v=True, global_kv_heads=1,
                                          tie_embeddings=False)),
    # The MoE block (26B-A4B) in every layer, attention as above: the dense MLP (the shared
    # expert) beside top-2 of 4 experts, each branch with its own norms, the router with its scales.
    'gemma4_text_moe': ('gemma4', dict(GEMMA4, n_layers=4, layer_types=('sliding', 'full') * 2,
                                       attn_k_eq_v=True, global_kv_heads=1, tie_embeddings=True,
                                       moe=dict(n_experts=4, experts_per_token=2, expert_dim=16,
                                                router='scaled_softmax', norm_topk_prob=True,
                                                shared_dim=64, shared_gate=False,
                                                branch_norms=True))),
}


def _tiny(overrides: dict):
  """tiny_config with `overrides`, its nested moe and linear_attn fields updated in place."""
  overrides = dict(overrides)
  moe, linear_attn = overrides.pop('moe', {}), overrides.pop('linear_attn', {})
  c = tiny_config(**overrides)
  c.model.moe.update(moe)
  c.model.linear_attn.update(linear_attn)
  return c


def _grouped_heads(stored, G, R, width):
  """llama.cpp qwen35's tiled value heads (r * G + g) back in grouped order (g * R + r)."""
  rest = stored.shape[1:]
  return stored.reshape(R, G, width, *rest).swapaxes(0, 1).reshape(stored.shape)


@pytest.mark.parametrize('label', list(EXPORT_ONLY))
def test_hybrids_and_gemma4_export_as_llama_cpps_converter_lays_them_out(tmp_path, sp_tokenizer, label):
  """The F16 file has only llama.cpp's names and keys for the architecture, its DeltaNet, KV-sharing,
  per-layer-input and RoPE keys, and its tensors as llama.cpp's converter writes them: A as
  -exp(A_log), the conv [channels, W] in F32, Qwen3.5's value heads tiled (r * G + g) and
  Qwen3-Next's q/k/v/z split from per-group rows; (1 + w) norms but the DeltaNet's gated one;
  Gemma 4's full layers' RoPE divisors, no k/v where layers share or reuse them, and its MoE block
  (the experts' gate_up as one tensor, the router's scales, the branch norms). lm does not read
  these architectures back. tests/io/test_llama_cpp.py runs the files in llama.cpp."""
  from lm.train.state import ModelSpec
  arch, overrides = EXPORT_ONLY[label]
  c = _tiny(overrides)
  m = c.model
  rng = np.random.default_rng(0)
  params = {n: rng.normal(size=s.shape).astype(np.float16).astype(np.float32)
            for n, s in ModelSpec(m).shapes.items()}
  out = tmp_path / f'{arch}.gguf'
  assert gguf_io.save(str(out), params, m, sp_tokenizer) == arch
  reader = gguf.GGUFReader(str(out))
  meta = {k: f.contents() for k, f in reader.fields.items()}
  own = {k.replace(arch, '{arch}', 1) for k in meta if k.startswith(arch + '.')}
  # recurrent_layers: llama.cpp's key (src/llama-arch.cpp) that the gguf package 0.19 lacks.
  assert own - {'{arch}.attention.recurrent_layers'} <= _arch_keys()
  names = {re.sub(r'\.(weight|bias|scale)$', '', re.sub(r'blk\.\d+\.', 'blk.{bid}.', t.name))
           for t in reader.tensors}  # ssm_a has no suffix
  assert names <= _gguf_names(arch)
  tensors = {t.name: t for t in reader.tensors}
  data = lambda name: np.asarray(tensors[name].data, np.float32)
  key = lambda k: meta[f'{arch}.{k}']
  if arch.startswith('qwen'):
    G, H, K, V, D = 2, 4, 8, 8, 32
    assert key('attention.recurrent_layers') == [True, True, True, False]
    assert [key(f'ssm.{k}') for k in ('conv_kernel', 'state_size', 'group_count', 'time_step_rank',
                                       'inner_size')] == [4, 8, 2, 4, 32]
    assert key('rope.dimension_count') == 8 and 'blk.0.attn_q.weight' not in tensors
    assert tensors['blk.3.attn_q.weight'].data.shape == (2 * 4 * 16, D)  # each head's query, gate
    assert tensors['blk.0.ssm_conv1d.weight'].tensor_type == Q.F32
    assert data('blk.0.ssm_conv1d.weight').shape == (2 * G * K + H * V, 4)
    np.testing.assert_array_equal(data('blk.0.ssm_norm.weight'), params['layers.linear_attn.norm.scale'][0])
    np.testing.assert_array_equal(data('blk.0.attn_norm.weight'), params['layers.attn_norm.scale'][0] + 1)
    np.testing.assert_array_equal(data('blk.3.post_attention_norm.weight'),
                                  params['layers.mlp_norm.scale'][3] + 1)
    rows = lambda name, i=0: params[f'layers.linear_attn.{name}.kernel'][i].reshape(D, -1).T
    qkv, gate, a = data('blk.1.attn_qkv.weight'), data('blk.1.attn_gate.weight'), data('blk.1.ssm_a')
    if arch == 'qwen3next':  # value heads grouped, as HF and lm hold them; b and a fused per group
      np.testing.assert_array_equal(qkv, np.concatenate([rows('q', 1), rows('k', 1), rows('v', 1)]))
      np.testing.assert_array_equal(gate, rows('z', 1))
      np.testing.assert_allclose(a, -np.exp(params['layers.linear_attn.A_log'][1]), rtol=1e-6)
      ba = data('blk.1.ssm_ba.weight').reshape(G, 2, H // G, D)
      np.testing.assert_array_equal(ba[:, 1].reshape(H, D), rows('a', 1))
    else:
      np.testing.assert_array_equal(qkv[:2 * G * K], np.concatenate([rows('q', 1), rows('k', 1)]))
      np.testing.assert_array_equal(_grouped_heads(qkv[2 * G * K:], G, H // G, V), rows('v', 1))
      np.testing.assert_array_equal(_grouped_heads(gate, G, H // G, V), rows('z', 1))
      np.testing.assert_allclose(_grouped_heads(a, G, H // G, 1),
                                 -np.exp(params['layers.linear_attn.A_log'][1]), rtol=1e-6)
      np.testing.assert_array_equal(_grouped_heads(data('blk.1.ssm_alpha.weight'), G, H // G, 1),
                                    rows('a', 1))
      assert key('rope.dimension_sections') == [2, 1, 1, 0]  # covers the 4 rotated pairs
    if arch != 'qwen35':
      assert (key('expert_count'), key('expert_feed_forward_length'),
              key('expert_shared_feed_forward_length')) == (4, 16, 24)
      np.testing.assert_array_equal(data('blk.2.ffn_gate_inp_shexp.weight'),
                                    params['layers.moe.shared_gate'][2].reshape(-1))
      assert tensors['blk.2.ffn_up_exps.weight'].data.shape == (4, 16, D)
  else:
    L, P, shared = m.n_layers, m.per_layer_input_dim, m.kv_shared_layers
    kinds = m.layer_types
    assert (key('attention.key_length'), key('attention.key_length_swa'),
            key('rope.dimension_count'), key('rope.dimension_count_swa')) == (32, 16, 32, 16)
    assert (key('rope.freq_base'), key('rope.freq_base_swa'), key('attention.sliding_window')) == (1e6, 1e4, 4)
    assert key('attention.sliding_window_pattern') == [k == 'sliding' for k in kinds]
    assert key('attention.head_count_kv') == [2 if k == 'sliding' else m.global_kv_heads or 2 for k in kinds]
    assert (key('attention.shared_kv_layers'), key('embedding_length_per_layer_input')) == (shared, P)
    np.testing.assert_array_equal(data('rope_freqs.weight'), np.float32([1.0] * 4 + [1e30] * 12))  # 1/4 of 16 pairs
    for i in range(L):
      has_kv, full = i < L - shared, kinds[i] == 'full'
      assert ('blk.%d.attn_k.weight' % i in tensors) == has_kv
      assert ('blk.%d.attn_v.weight' % i in tensors) == (has_kv and not (full and m.attn_k_eq_v))
      assert tensors[f'blk.{i}.attn_q.weight'].data.shape == (4 * (32 if full else 16), 32)
    np.testing.assert_array_equal([data(f'blk.{i}.layer_output_scale.weight')[0] for i in range(L)],
                                  params['layers.layer_scale.scale'][:, 0])
    np.testing.assert_array_equal(data('blk.0.attn_norm.weight'), params['layers.attn_norm.scale'][0])
    assert ('output.weight' in tensors) == (not m.tie_embeddings)
    if P:
      assert key('feed_forward_length') == [64] * 4 + [128] * 2
      assert tensors['per_layer_token_embd.weight'].data.shape == (m.vocab_size, L * P)
      np.testing.assert_array_equal(data('blk.5.inp_gate.weight'),
                                    params['layers.per_layer_input.gate.kernel'][5].T)
    else:
      assert key('feed_forward_length') == 64
    if m.moe.n_experts:  # conversion/gemma.py's layout: the experts' gate and up one tensor
      assert (key('expert_count'), key('expert_used_count'), key('expert_feed_forward_length')) == (4, 2, 16)
      moe = lambda name, i=2: params[f'layers.moe.{name}'][i]
      np.testing.assert_array_equal(data('blk.2.ffn_gate_up_exps.weight'), np.concatenate(
          [moe('gate.kernel').transpose(0, 2, 1), moe('up.kernel').transpose(0, 2, 1)], axis=1))
      np.testing.assert_array_equal(data('blk.2.ffn_down_exps.weight'),
                                    moe('down.kernel').transpose(0, 2, 1))
      np.testing.assert_array_equal(data('blk.2.ffn_gate_inp.weight'), moe('router').T)
      np.testing.assert_array_equal(data('blk.2.ffn_gate.weight'), moe('shared.gate.kernel').T)
      for name, lm_name in (('ffn_gate_inp.scale', 'router_scale'),
                            ('ffn_down_exps.scale', 'expert_scale'),
                            ('ffn_norm.weight', 'layers.mlp_norm.scale'),
                            ('post_ffw_norm_1.weight', 'shared_post_norm.scale'),
                            ('pre_ffw_norm_2.weight', 'experts_norm.scale'),
                            ('post_ffw_norm_2.weight', 'experts_post_norm.scale'),
                            ('post_ffw_norm.weight', 'layers.mlp_post_norm.scale')):
        want = params[lm_name][2] if lm_name.startswith('layers.') else moe(lm_name)
        assert tensors[f'blk.2.{name}'].tensor_type == Q.F32
        np.testing.assert_array_equal(data(f'blk.2.{name}'), want)
  with pytest.raises(CheckpointError, match=f"GGUF architecture '{arch}' is not supported"):
    gguf_io.model_config(str(out))

