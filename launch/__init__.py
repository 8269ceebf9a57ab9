"""Launchers for `lm train`: one machine (`local`), SLURM GPU clusters (`slurm`), TPU pod slices
(`tpu`), and config sweeps over any of them (`sweep`).

Each module runs as `python -m launch.<name> ... --dry-run`, which prints the exact commands (or,
for SLURM, the batch script) without running anything. Multi-host runs rely on JAX's own
multi-controller runtime (`jax.distributed`); the launchers only start the same command on every
host with the environment each platform expects.
"""
