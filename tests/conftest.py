"""Test session setup: no hub access, and Triton's CPU interpreter when there is no GPU."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

if not torch.cuda.is_available():
    # Must be set before triton is imported anywhere: the kernels then run on CPU tensors.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The suite runs as `pytest -n 2` on 2 cores: two workers with torch's default thread pool oversubscribe the
# CPU, and tiny ops then spin for 10-100x their run time. One intra-op thread per worker; no numerics change.
torch.set_num_threads(1)
