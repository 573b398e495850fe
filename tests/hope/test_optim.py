"""hope.optim.M3 (Algorithm 1 of the arXiv Nested Learning, Multi-scale Momentum Muon): equal to a literal,
loop-based transcription of the algorithm on tiny problems, its AdamW fallback equal to torch.optim.AdamW,
deterministic, exact across a state_dict save / load, its param-group split, its errors, and `hope-train
--optim m3` (with exact resumption)."""
from __future__ import annotations

import io
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from hope.optim import M3, m3_param_groups, newton_schulz

from .utils_hope import tiny_config, tiny_model

F64 = torch.float64


# ------------------------------------------------------------------------- a literal Algorithm 1, by the loops


def literal_newton_schulz(M: torch.Tensor, T: int) -> torch.Tensor:
    """Newton-Schulz_T as M3 specifies it: X = M / ||M||_F, then T times X <- a X + b A X + c A² X, A = X Xᵀ,
    on the short side of M (Muon's quintic)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    tall = M.shape[0] > M.shape[1]
    X = M.T if tall else M
    X = X / (torch.sqrt((X * X).sum()) + 1e-7)
    for _ in range(T):
        A = X @ X.T
        X = a * X + b * (A @ X) + c * (A @ (A @ X))
    return X.T if tall else X


def algorithm_1(theta_0, loss_of, steps, lr, beta1, beta2, beta3, alpha, eps, f, T):
    """Algorithm 1, line by line: the outer loop over lower-frequency iterations k, the inner over t. The slow
    sum runs over the previous chunk's gradients, i = (k-1)f+1 .. kf (none for k = 0). Returns Θ after every
    step."""
    theta = [w.clone() for w in theta_0]
    M1 = [torch.zeros_like(w) for w in theta]
    M2 = [torch.zeros_like(w) for w in theta]
    V = [torch.zeros_like(w) for w in theta]
    g = {}  # t -> the gradients at step t
    trajectory = []
    k = 0
    while len(trajectory) < steps:
        for j in range(len(theta)):  # Slow Memory: M2 = M2 + β3 Σ_i g_i
            for i in range((k - 1) * f + 1, k * f + 1):
                if i >= 1:
                    M2[j] = M2[j] + beta3 * g[i][j]
        O2 = [literal_newton_schulz(M2[j], T) for j in range(len(theta))]
        for t in range(k * f + 1, (k + 1) * f + 1):
            if t > steps:
                break
            params = [w.clone().requires_grad_(True) for w in theta]
            g[t] = list(torch.autograd.grad(loss_of(params), params))  # Compute Gradient
            for j in range(len(theta)):
                M1[j] = M1[j] + beta1 * g[t][j]  # First Momentum
                V[j] = V[j] + beta2 * g[t][j] ** 2  # Second Momentum
                O1 = literal_newton_schulz(M1[j], T)
                theta[j] = theta[j] - lr * (O1 + alpha * O2[j]) / torch.sqrt(V[j] + eps)
            trajectory.append([w.clone() for w in theta])
        k += 1
    return trajectory


def run_m3(theta_0, loss_of, steps, **kwargs):
    params = [torch.nn.Parameter(w.clone()) for w in theta_0]
    optimizer = M3([{"params": params, "use_m3": True}], **kwargs)
    trajectory = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss_of(params).backward()
        optimizer.step()
        trajectory.append([p.detach().clone() for p in params])
    return trajectory


def two_layer_problem(seed: int = 0):
    """A tiny tanh regression with a wide (3 x 5) and a tall (5 x 2) weight: its gradients keep changing."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 3, generator=generator, dtype=F64)
    y = torch.randn(16, 2, generator=generator, dtype=F64)
    theta_0 = [torch.randn(3, 5, generator=generator, dtype=F64) * 0.5,
               torch.randn(5, 2, generator=generator, dtype=F64) * 0.5]

    def loss_of(params):
        return ((torch.tanh(x @ params[0]) @ params[1] - y) ** 2).mean()

    return theta_0, loss_of


@pytest.mark.parametrize("f, alpha, steps", [(5, 1.0, 23), (1, 0.5, 6), (4, 0.0, 9), (30, 2.0, 10)])
def test_m3_equals_a_literal_transcription_of_algorithm_1(f, alpha, steps):
    theta_0, loss_of = two_layer_problem()
    hyper = dict(lr=0.02, beta1=0.9, beta2=0.99, beta3=0.7, alpha=alpha, eps=1e-8)
    literal = algorithm_1(theta_0, loss_of, steps, f=f, T=5, **hyper)
    ours = run_m3(theta_0, loss_of, steps, lr=hyper["lr"], betas=(0.9, 0.99, 0.7), alpha=alpha, eps=1e-8,
                  slow_chunk_size=f, ns_steps=5)
    for t, (a, b) in enumerate(zip(literal, ours), start=1):
        worst = max((x - y).abs().max().item() for x, y in zip(a, b))
        assert worst < 1e-12, f"f={f}: step {t} differs from Algorithm 1 by {worst:.3g}"
    moved = max((x - y).abs().max().item() for x, y in zip(literal[-1], theta_0))
    assert moved > 1e-2, "the parameters barely moved: the comparison says little"


def test_the_slow_momentum_changes_the_trajectory_after_the_first_chunk():
    """α O2 is zero through the first chunk (no past chunk), then acts: a check that the slow path is live."""
    theta_0, loss_of = two_layer_problem(seed=3)
    common = dict(lr=0.02, betas=(0.9, 0.99, 0.7), slow_chunk_size=4)
    with_slow = run_m3(theta_0, loss_of, 8, alpha=1.0, **common)
    without = run_m3(theta_0, loss_of, 8, alpha=0.0, **common)
    gap = [max((x - y).abs().max().item() for x, y in zip(a, b)) for a, b in zip(with_slow, without)]
    assert max(gap[:4]) == 0.0 and gap[4] > 1e-4, gap


# ------------------------------------------------------------------------------------------ Newton-Schulz


@pytest.mark.parametrize("shape", [(5, 3), (3, 5), (8, 8), (2, 4, 6)])
def test_newton_schulz_is_an_approximate_polar_factor(shape):
    matrix = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=F64)
    out = newton_schulz(matrix, steps=5)
    assert out.shape == matrix.shape and out.dtype == F64
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    inner = U.mT @ out @ Vh.mT  # diagonal (the singular vectors are kept), entries in Muon's band
    diagonal = torch.diagonal(inner, dim1=-2, dim2=-1)
    assert (inner - torch.diag_embed(diagonal)).abs().max() < 1e-10
    assert diagonal.min() > 0.6 and diagonal.max() < 1.25, diagonal
    assert torch.allclose(newton_schulz(7.5 * matrix), out, atol=1e-10)  # scale-invariant
    if len(shape) == 3:
        assert torch.allclose(out[1], newton_schulz(matrix[1]), atol=1e-12)  # batched over the leading dim
    assert not newton_schulz(torch.zeros(*shape)).any()
    with pytest.raises(ValueError, match="matrix"):
        newton_schulz(torch.ones(4))


# ------------------------------------------------------------------------------------------ AdamW fallback


def test_the_adamw_fallback_equals_torch_adamw():
    generator = torch.Generator().manual_seed(0)
    init = [torch.randn(7, generator=generator), torch.randn(3, 4, generator=generator)]
    targets = [torch.randn(7, generator=generator), torch.randn(3, 4, generator=generator)]

    def trajectory(make_optimizer):
        params = [torch.nn.Parameter(w.clone()) for w in init]
        optimizer = make_optimizer(params)
        for _ in range(15):
            optimizer.zero_grad()
            sum(((p - t) ** 4).sum() for p, t in zip(params, targets)).backward()
            optimizer.step()
        return [p.detach() for p in params]

    ours = trajectory(lambda ps: M3([{"params": ps, "use_m3": False}], lr=0.03, adamw_betas=(0.8, 0.95),
                                    adamw_eps=1e-6, weight_decay=0.1))
    theirs = trajectory(lambda ps: torch.optim.AdamW(ps, lr=0.03, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1))
    for a, b in zip(ours, theirs):
        assert (a - b).abs().max() < 1e-6


def test_a_group_without_use_m3_routes_by_shape():
    """Matrices take the M3 step, vectors the AdamW step: equal to two separate optimizers."""
    generator = torch.Generator().manual_seed(1)
    init = [torch.randn(4, 3, generator=generator, dtype=F64), torch.randn(5, generator=generator, dtype=F64)]

    def loss_of(params):
        return (params[0].sin().sum() + (params[1] ** 2).sum()) ** 2

    def trajectory(make_optimizers):
        params = [torch.nn.Parameter(w.clone()) for w in init]
        optimizers = make_optimizers(params)
        for _ in range(8):
            for optimizer in optimizers:
                optimizer.zero_grad()
            loss_of(params).backward()
            for optimizer in optimizers:
                optimizer.step()
        return [p.detach() for p in params]

    mixed = trajectory(lambda ps: [M3(ps, lr=0.01, slow_chunk_size=3)])
    split = trajectory(lambda ps: [M3([{"params": [ps[0]], "use_m3": True}], lr=0.01, slow_chunk_size=3),
                                   torch.optim.AdamW([ps[1]], lr=0.01, weight_decay=0.0)])
    for a, b in zip(mixed, split):
        assert (a - b).abs().max() < 1e-12


# ---------------------------------------------------------------------- a Hope model: groups, state, determinism


def train_steps(model, optimizer, steps: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=generator)
        optimizer.zero_grad()
        model(ids, labels=ids).loss.backward()
        optimizer.step()


def hope_and_m3(seed: int = 0):
    model = tiny_model(tiny_config(), dtype=torch.float32, seed=seed).train()
    optimizer = M3(m3_param_groups(model, lr=1e-3, adamw_lr=1e-2, weight_decay=0.01), slow_chunk_size=3)
    return model, optimizer


def test_m3_param_groups_split_a_hope_model():
    model = tiny_model(tiny_config(mixer="attention"), dtype=torch.float32)
    groups = m3_param_groups(model, lr=1e-3, adamw_lr=1e-2, weight_decay=0.1)
    names = {id(p): name for name, p in model.named_parameters()}
    by_group = [{names[id(p)] for p in group["params"]} for group in groups]
    everything = [n for group in by_group for n in group]
    assert sorted(everything) == sorted(names.values()), "every trainable parameter in exactly one group"
    m3, adamw_decay, adamw_flat = by_group
    assert groups[0]["use_m3"] and not groups[1]["use_m3"] and not groups[2]["use_m3"]
    assert "model.embed_tokens.weight" in adamw_decay  # the tied head is the same tensor
    assert {"model.layers.0.mixer.q_proj.weight", "model.layers.0.cms.levels.0.w_gate",
            "model.layers.0.cms.levels.0.p_v"} <= m3
    assert all(name.endswith(("norm.weight", "b_eta", "w_eta", "level_weights")) or "norms" in name
               for name in adamw_flat), adamw_flat
    assert (groups[0]["lr"], groups[1]["lr"], groups[1]["weight_decay"], groups[2]["weight_decay"]) == (
        1e-3, 1e-2, 0.1, 0.0)
    defaults = M3(m3_param_groups(model, adamw_lr=1e-2), lr=5e-4).param_groups  # no lr: M3's own lr applies
    assert (defaults[0]["lr"], defaults[1]["lr"]) == (5e-4, 1e-2)
    titans = tiny_model(tiny_config(), dtype=torch.float32)
    m3_titans = {n for n, p in titans.named_parameters()
                 if any(p is q for q in m3_param_groups(titans, lr=1e-3, adamw_lr=1e-2)[0]["params"])}
    assert "model.layers.0.mixer.memory_init" in m3_titans  # (H, 3d+2, d): one matrix per head
    assert not any("conv" in name for name in m3_titans)  # short-convolution taps go to AdamW


def test_training_a_hope_model_is_deterministic_and_finite():
    runs = []
    for _ in range(2):
        model, optimizer = hope_and_m3()
        train_steps(model, optimizer, 5)
        runs.append({name: p.detach().clone() for name, p in model.named_parameters()})
    assert all(torch.equal(runs[0][name], runs[1][name]) for name in runs[0])
    assert all(torch.isfinite(p).all() for p in runs[0].values())


def test_state_dict_round_trip_resumes_exactly():
    """7 steps, save, load into a fresh optimizer on a copy of the model, 6 more steps (a slow-chunk boundary
    after the resume) == 13 steps in one go."""
    whole_model, whole = hope_and_m3()
    train_steps(whole_model, whole, 7)
    cut_model, cut = hope_and_m3()
    train_steps(cut_model, cut, 7)
    buffer = io.BytesIO()
    torch.save({"model": cut_model.state_dict(), "optimizer": cut.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_model, resumed = hope_and_m3(seed=5)  # other initial weights: all of it must come from the file
    resumed_model.load_state_dict(saved["model"])
    resumed.load_state_dict(saved["optimizer"])
    assert resumed.state_dict()["state"].keys() == whole.state_dict()["state"].keys()
    train_steps(whole_model, whole, 6, seed=1)
    train_steps(resumed_model, resumed, 6, seed=1)
    for (name, a), b in zip(whole_model.named_parameters(), resumed_model.parameters()):
        assert torch.equal(a, b), f"{name} differs after the resume"


@pytest.mark.parametrize("kwargs, match", [
    (dict(betas=(0.9, 0.99)), "betas"),
    (dict(betas=(0.9, 1.0, 0.9)), "betas"),
    (dict(slow_chunk_size=0), "slow_chunk_size"),
    (dict(ns_steps=2.5), "ns_steps"),
    (dict(lr=0.0), "lr"),
    (dict(alpha=-1.0), "alpha"),
])
def test_bad_hyperparameters_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        M3([torch.nn.Parameter(torch.zeros(2, 2))], **kwargs)


def test_a_vector_in_a_use_m3_group_is_rejected():
    with pytest.raises(ValueError, match=r"use_m3=True group.*\(3,\)"):
        M3([{"params": [torch.nn.Parameter(torch.zeros(3))], "use_m3": True}])
    optimizer = M3([torch.nn.Parameter(torch.zeros(2, 2))])
    with pytest.raises(ValueError, match="use_m3"):
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))], "use_m3": "yes"})


# ------------------------------------------------------------------------------------ hope-train --optim m3


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("data") / "topics.jsonl"
    with path.open("w") as handle:
        for text in list(topics.values())[:20]:
            handle.write(json.dumps({"text": text}) + "\n")
    return path


def hope_train_m3(output, corpus, *extra: str, steps: int = 4):
    from hope.train import main

    return main(["--model", "tiny", "--data", str(corpus), "--config_overrides",
                 "hidden_size=32,num_heads=2,num_hidden_layers=1,chunk_size=8,cms_chunk_sizes=[4,None]",
                 "--seq_len", "32", "--max_steps", str(steps), "--per_device_train_batch_size", "2", "--use_cpu",
                 "--output_dir", str(output), "--learning_rate", "3e-3", "--logging_steps", "1", "--disable_tqdm",
                 "true", "--seed", "0", "--validation_split_percentage", "0", "--save_steps", "2",
                 "--optim", "m3", "--optim_args", "slow_chunk_size=3,lr=1e-3", *extra])


def test_hope_train_optim_m3_trains_and_resumes_exactly(tmp_path, corpus):
    import shutil

    hope_train_m3(tmp_path / "whole", corpus)
    state = torch.load(tmp_path / "whole" / "checkpoint-4" / "optimizer.pt", weights_only=True)
    assert {"fast_momentum", "slow_orthogonal"} <= set(next(iter(state["state"].values())))  # M3's own state
    assert state["param_groups"][0]["slow_chunk_size"] == 3
    assert {group["initial_lr"] for group in state["param_groups"]} == {1e-3, 3e-3}  # M3, AdamW
    losses = [e["loss"] for e in json.loads((tmp_path / "whole" / "trainer_state.json").read_text())["log_history"]
              if "loss" in e]
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)
    hope_train_m3(tmp_path / "cut", corpus)
    shutil.rmtree(tmp_path / "cut" / "checkpoint-4")
    hope_train_m3(tmp_path / "cut", corpus, "--resume_from_checkpoint", "last")
    a, b = (load_file(str(tmp_path / run / "model.safetensors")) for run in ("whole", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a), "resuming M3 from checkpoint-2 changed the weights"


def test_hope_train_rejects_unknown_m3_options(tmp_path, corpus, capsys):
    with pytest.raises(SystemExit) as exit_info:
        hope_train_m3(tmp_path / "bad", corpus, "--optim_args", "slow_chunk=3", steps=1)
    assert exit_info.value.code == 2
    assert "slow_chunk" in capsys.readouterr().err


def test_the_demo_trains_both_models_with_m3(tmp_path, capsys):
    from hope.demo import main as demo_main

    results = demo_main(["--demo", "--tiny", "--max-steps", "2", "--device", "cpu", "--num-threads", "1",
                         "--output-dir", str(tmp_path), "--optim", "m3", "--m3-args", "slow_chunk_size=1"])
    out = capsys.readouterr().out
    assert out.count(", m3, 2 steps of") == 2, out
    assert all(math.isfinite(result.final_val_loss) for result in results.values())
    assert json.loads((tmp_path / "summary.json").read_text())["args"]["optim"] == "m3"
