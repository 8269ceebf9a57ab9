"""SentencePiece tokenizers: load a `.model`, or train one from the corpus."""

from __future__ import annotations

import os
import tempfile

import sentencepiece as spm

from lm.errors import DataError


class Tokenizer:
  """Text <-> ids with explicit BOS/EOS/pad ids."""

  def __init__(self, path: str):
    if not os.path.isfile(path):
      raise DataError(f'tokenizer {path!r} not found; pass a SentencePiece .model or leave '
                      'data.tokenizer unset to train one')
    self.path = path
    self.sp = spm.SentencePieceProcessor()
    try:
      self.sp.Load(path)
    except (OSError, RuntimeError) as e:
      raise DataError(f'tokenizer {path!r} is not a SentencePiece model ({e})') from None

  @property
  def vocab_size(self) -> int:
    return self.sp.GetPieceSize()

  @property
  def bos_id(self) -> int:
    return self.sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self.sp.eos_id()

  @property
  def pad_id(self) -> int:
    # Many models (Llama-2) define no pad piece; padding is masked by weights anyway.
    return max(self.sp.pad_id(), 0)

  def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
    ids = self.sp.EncodeAsIds(text)
    return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return self.sp.EncodeAsIds(texts)

  def decode(self, ids) -> str:
    return self.sp.DecodeIds([int(i) for i in ids])


def train_tokenizer(docs: list[str], path: str, vocab_size: int, model_type: str = 'bpe',
                    seed: int = 0) -> Tokenizer:
  """Trains a byte-fallback SentencePiece model on `docs` and writes it atomically to `path`."""
  if model_type not in ('bpe', 'unigram'):
    raise DataError(f'data.tokenizer_model_type={model_type!r}; choose bpe or unigram')
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=directory) as tmp:
    prefix = os.path.join(tmp, 'sp')
    try:
      spm.SentencePieceTrainer.Train(
          sentence_iterator=(line for d in docs for line in d.split('\n') if line.strip()), model_prefix=prefix, vocab_size=vocab_size,
          model_type=model_type, byte_fallback=True, character_coverage=0.9995,
          pad_id=0, unk_id=1, bos_id=2, eos_id=3, split_digits=True,
          input_sentence_size=2_000_000, shuffle_input_sentence=True,
          num_threads=os.cpu_count() or 1, minloglevel=2)
    except RuntimeError as e:
      raise DataError(f'tokenizer training failed: {e}; try a smaller data.tokenizer_vocab_size') from None
    os.replace(prefix + '.model', path)
  return Tokenizer(path)
