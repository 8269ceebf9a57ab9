"""Per-chip memory of a compiled train step with the whole logits (loss_chunk_size=0) and with the
chunked loss, for a TPU topology compiled from this host (no TPU needed: libtpu compiles).

  python -m lm.bench.loss_memory                      # the table in docs/pretraining.md
  python -m lm.bench.loss_memory --rows 8b --chunks 0,512

Each row compiles the full fine-tuning step (float32 parameters, bfloat16 compute, full remat,
FSDP over the topology's chips) and reads XLA's memory_analysis(): the compiler's peak per chip
(`lm.bench.plan.device_bytes`, what libtpu compares with HBM), and beside it the temporaries' size,
which is larger than what is ever live at once. Needs `libtpu` matching the installed jax
(jax 0.10.2: pip install 'libtpu==0.0.42.*'). An 8B compile takes minutes on a small CPU host.
"""

from __future__ import annotations

import argparse
import os
import time

from lm import config as config_lib
from lm.bench import plan as plan_lib

# name -> (model preset, vocabulary size override or None, batch, seq_len)
ROWS = {
    '8b': ('8b', None, 16, 2048),
    '1b-128k': ('1b', None, 16, 2048),
    '1b-152k': ('1b', 151936, 16, 2048),  # Qwen3's vocabulary
    '1b-262k': ('1b', 262144, 16, 2048),  # Gemma 3's vocabulary
}


def step_config(preset: str, vocab: int | None, batch: int, seq_len: int, chunk: int):
  c = config_lib.base_config()
  c.model = config_lib.model_config(preset)
  if vocab:
    c.model.vocab_size = vocab
  c.model.update(param_dtype='float32', compute_dtype='bfloat16', remat='full', attention='xla',
                 loss_chunk_size=chunk)
  c.data.update(seq_len=seq_len, batch_size=batch)
  c.mesh.shape.update(data=1, fsdp=-1, tensor=1)
  return c


def compiled_bytes(cfg, devices) -> dict:
  """memory_analysis() of the compiled train step on `devices`, per chip."""
  from lm.train.loop import Trainer  # pylint: disable=import-outside-toplevel
  from lm.train.state import abstract_with_shardings  # pylint: disable=import-outside-toplevel
  trainer = Trainer(cfg, devices=devices)
  state = abstract_with_shardings(trainer.abstract_state, trainer.shardings)
  batch = plan_lib.abstract_batch(cfg, trainer.batch_sharding)
  m = trainer.step.lower(state, batch).compile().memory_analysis()
  total = plan_lib.device_bytes(m, 'tpu')
  return {'total': total, 'temp': m.temp_size_in_bytes, 'arguments': m.argument_size_in_bytes}


def tpu_devices(topology: str):
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  # Compile-only use takes no real chips: skip libtpu's machine-wide lock (lm/bench/targets.py).
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  return topologies.get_topology_desc(platform='tpu', topology_name=topology).devices


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--topology', default='v5p:2x2x1', help="TPU topology name, e.g. v5p:2x2x1 (v5p-8)")
  parser.add_argument('--rows', default=','.join(ROWS), help=f'comma-separated, from {list(ROWS)}')
  parser.add_argument('--chunks', default='0,512', help='loss_chunk_size values; 0 = whole logits')
  args = parser.parse_args(argv)
  devices = tpu_devices(args.topology)
  print(f'{args.topology}: {len(devices)} x {devices[0].device_kind}; fp32 params, bf16 compute, '
        f'full remat, FSDP; GiB per chip (peak: the compiler\'s peak; temp: its temporaries\' size)')
  print(f'{"model":<9}{"vocab":>8}{"batch":>7}{"seq":>6}{"chunk":>7}{"peak":>8}{"temp":>10}'
        f'{"compile s":>11}', flush=True)
  for row in args.rows.split(','):
    preset, vocab, batch, seq_len = ROWS[row]
    for chunk in (int(c) for c in args.chunks.split(',')):
      cfg = step_config(preset, vocab, batch, seq_len, chunk)
      start = time.perf_counter()
      b = compiled_bytes(cfg, devices)
      print(f'{preset:<9}{cfg.model.vocab_size:>8}{batch:>7}{seq_len:>6}{chunk:>7}'
            f'{b["total"] / 2**30:>8.1f}{b["temp"] / 2**30:>10.1f}'
            f'{time.perf_counter() - start:>11.0f}', flush=True)


if __name__ == '__main__':
  main()
