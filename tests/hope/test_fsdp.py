"""FSDP2 (`torch.distributed.fsdp.fully_shard`) on Hope: 2 gloo processes on CPU, every HopeBlock sharded, train
exactly as one process with the global batch (issue 12); and hope-train's --fsdp, which only accelerate's FSDP2
path on accelerators can serve, refuses CPU with a clear message instead of quietly running DDP."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hope import HopeForCausalLM
from hope.train import main
from tests.hope.utils_hope import F64, random_ids, tiny_config, tiny_model

REPO = Path(__file__).resolve().parents[2]
CONFIGS = {  # the parameter shapes FSDP2 must shard: memories, per-head and per-level vectors, tied head
    "titans": dict(momentum=False),
    "deep_momentum_independent": dict(memory_depth=2, momentum=True, cms_variant="independent"),
    "attention_untied": dict(mixer="attention", tie_word_embeddings=False),
}
STEPS, BATCH, LENGTH, LR = 3, 4, 9, 1e-2

WORKER = textwrap.dedent('''
    import json, sys
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Shard
    from hope.modeling_hope import HopeBlock
    from tests.hope.test_fsdp import CONFIGS, batches, new_model, train

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for name in CONFIGS:
        model = new_model(name)
        blocks = [module for module in model.modules() if isinstance(module, HopeBlock)]
        for block in blocks:
            fully_shard(block)
        fully_shard(model)
        sharded = all(isinstance(p, DTensor) and p.placements == (Shard(0),)
                      for block in blocks for p in block.parameters())
        rows = slice(rank * len(batches()[0]) // world, (rank + 1) * len(batches()[0]) // world)
        losses = train(model, [ids[rows] for ids in batches()])
        state = {key: value.full_tensor() for key, value in model.state_dict().items()}
        gathered = [None] * world
        dist.all_gather_object(gathered, losses)
        if rank == 0:
            torch.save(state, f"{sys.argv[1]}/{name}.pt")
            results[name] = dict(losses=gathered, sharded=sharded, blocks=len(blocks))
    if rank == 0:
        with open(f"{sys.argv[1]}/results.json", "w") as handle:
            json.dump(results, handle)
    dist.destroy_process_group()
''')


def new_model(name: str):
    return tiny_model(tiny_config(**CONFIGS[name]), dtype=F64).train()


def batches() -> list:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, 50, (BATCH, LENGTH), generator=generator) for _ in range(STEPS)]


def train(model, steps: list) -> list:
    """AdamW steps on the mean next-token loss; every row holds the same number of targets, so the mean of the
    processes' losses (FSDP averages their gradients) is the loss of the whole batch. The model is float64, but
    its RMSNorms and transformers' loss compute in fp32, so sums over other batch splits agree to fp32 rounding."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    for ids in steps:
        loss = model(ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_fully_shard_every_block_on_two_gloo_processes_equals_one_process(tmp_path):
    (tmp_path / "worker.py").write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               str(tmp_path / "worker.py"), str(tmp_path)],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    for name in CONFIGS:
        result = results[name]
        assert result["sharded"] and result["blocks"] == 2, "every HopeBlock parameter is a Shard(0) DTensor"
        model = new_model(name)
        losses = train(model, batches())
        per_process = torch.tensor(result["losses"], dtype=F64)  # (processes, steps)
        assert torch.allclose(per_process.mean(0), torch.tensor(losses, dtype=F64), rtol=0, atol=1e-6), name
        sharded_state = torch.load(tmp_path / f"{name}.pt")
        state = model.state_dict()
        assert sharded_state.keys() == state.keys()
        worst = max((sharded_state[key] - state[key]).abs().max().item() for key in state)
        assert worst < 1e-6, f"{name}: weights after FSDP differ by {worst}"


def test_hope_train_fsdp_on_cpu_is_refused_with_a_reason(tmp_path, capsys):
    data = tmp_path / "corpus.txt"
    data.write_text("Hope learns in context.\n" * 50)
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "tiny", "--data", str(data), "--seq_len", "32", "--max_steps", "1", "--use_cpu",
              "--output_dir", str(tmp_path / "out"), "--fsdp"])
    assert exit_info.value.code == 2
    assert "--fsdp needs several processes on accelerators" in capsys.readouterr().err


DDP_WORKER = textwrap.dedent('''
    import sys
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from tests.hope.utils_hope import random_ids, tiny_config
    from hope import HopeForCausalLM

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = HopeForCausalLM(tiny_config(cms_chunk_sizes=[16, None], kernel_backend="torch")).train()
    ddp = DistributedDataParallel(model, find_unused_parameters=False)
    for _ in range(3):
        ids = random_ids(2, 11)
        ddp(input_ids=ids, labels=ids).loss.backward()
    print("steps done")
    dist.destroy_process_group()
''')


def test_ddp_with_a_level_longer_than_the_sequences(tmp_path):
    """A CMS level whose chunk (16) is longer than the training sequences (11 tokens; the presets' 2048 level at
    hope-train's 1024) takes no step a token reads: its eta and target parameters get exact zero gradients, so DDP
    with find_unused_parameters=False (HF Trainer's setting under activation checkpointing) trains; before, they
    had no gradient and the second step raised."""
    torch.manual_seed(0)
    model = HopeForCausalLM(tiny_config(cms_chunk_sizes=[16, None], kernel_backend="torch")).train()
    ids = random_ids(2, 11)
    model(input_ids=ids, labels=ids).loss.backward()
    level = model.model.layers[0].cms.levels[0]
    assert all(p.grad is not None and not p.grad.any() for p in (level.p_v, level.w_eta, level.b_eta))
    assert level.w_down.grad is not None and level.w_down.grad.any()
    env = dict(os.environ, PYTHONPATH=str(REPO), MASTER_ADDR="127.0.0.1", MASTER_PORT="29531", RANK="0",
               WORLD_SIZE="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", DDP_WORKER], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "steps done" in done.stdout, done.stderr[-3000:]
