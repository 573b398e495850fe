"""Test session setup: no hub access, and Triton's CPU interpreter when there is no GPU."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# MKL's conditional numerical reproducibility, read when MKL first runs (so before torch computes anything): its
# default kernels pick code paths by the operands' memory alignment, so the same float64 product of the same
# values can differ in the last bit between a model and its reload (safetensors' tensors are not 64-byte
# aligned), or between a parameter and parameter + 0. The tests that assert bitwise-equal logits after
# save/load, consolidation or a merge need the strict mode; it changes no value beyond rounding.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import torch  # noqa: E402

if not torch.cuda.is_available():
    # Must be set before triton is imported anywhere: the kernels then run on CPU tensors.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The suite runs as `pytest -n 2` on 2 cores: two workers with torch's default thread pool oversubscribe the
# CPU, and tiny ops then spin for 10-100x their run time. One intra-op thread per worker; no numerics change.
torch.set_num_threads(1)
