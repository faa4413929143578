"""Benchmark harness: data sets, negative sampling, full-ranking evaluation and experiment drivers."""
