"""Benchmarks run with the test suite's settings: no hub access, the Triton interpreter without a GPU."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

# One intra-op thread: on the 2-core box a second thread mostly spins against other processes, which makes
# timings of the many small ops of the reference path swing 10x. Override with HOPE_BENCH_THREADS.
torch.set_num_threads(int(os.environ.get("HOPE_BENCH_THREADS", "1")))
