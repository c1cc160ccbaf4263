"""Reproducible benchmarks, their result files (``benchmarks/results/``) and the tables generated from them."""
