"""Benchmarks behind `lm bench`: one harness, one module per benchmark."""
