"""Benchmarks run with the test suite's settings: no hub access, the Triton interpreter without a GPU."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
