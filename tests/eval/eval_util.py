"""A model to evaluate without training one: random weights of the tiny test shape, a 512-piece
SentencePiece tokenizer trained on a few stdlib docs, on a one-device mesh."""

import functools

import jax
import pydoc_data.topics
from conftest import tiny_config

from lm import sharding as sharding_lib
from lm.data import tokenizer as tokenizer_lib
from lm.eval.evaluate import Model
from lm.train.state import ModelSpec


@functools.lru_cache(maxsize=None)
def _tokenizer(directory: str):
  docs = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)[:30]]
  return tokenizer_lib.train_tokenizer(docs, f"{directory}/sp.model", 512)


def random_model(directory: str, seed: int = 0, name: str = 'random') -> Model:
  c = tiny_config(vocab_size=512, max_seq_len=64)
  spec = ModelSpec(c.model)
  params = jax.jit(spec.init)(jax.random.key(seed))
  mesh = sharding_lib.make_mesh(c.mesh, jax.devices()[:1])
  return Model(name, c, spec, params, _tokenizer(str(directory)), mesh, '', 0)
