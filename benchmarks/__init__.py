"""Benchmark suites and the GPU suite (a package so that `benchmarks.workloads` imports from the repo root)."""
