"""The GPU suite's --dry-run (CPU, tiny shapes) goes through every code path and writes consistent results.

One dry run (~25 s on the 2-core box) is checked for schema, arithmetic, peers, model level, goals and
markdown; a second, tiny one checks that a failing case is recorded and the run continues; the goal rules are
checked on hand-made figures.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
from typing import Optional

import torch

from benchmarks import gpu_suite as S
from benchmarks import workloads as W

INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"


def test_dry_run(tmp_path) -> None:
    """One dry run (~25 s), checked by the `check_*` functions below. A single test rather than a module
    fixture: under `pytest -n 2` a shared fixture would run once per worker."""
    assert S.main(["--dry-run", "--out-dir", str(tmp_path)]) == 0
    files = sorted(os.listdir(tmp_path))
    jsons = [f for f in files if f.endswith(".json")]
    assert len(jsons) == 1, files
    with open(tmp_path / jsons[0]) as f:
        results = json.load(f)
    with open(tmp_path / jsons[0].replace(".json", ".md")) as f:
        markdown = f.read()
    run = (results, markdown, files)
    for check in (check_files_and_header, check_kernel_cases, check_deep_memory_cases, check_peers_recorded_explicitly,
                  check_model_level, check_goals_and_markdown):
        check(run)


def close(a: float, b: float, rel: float = 2e-3) -> bool:
    return math.isclose(a, b, rel_tol=rel)


def check_files_and_header(dry_run: tuple) -> None:
    results, _, files = dry_run
    assert files == [f"dryrun_{results['date'][:10]}.json", f"dryrun_{results['date'][:10]}.md"]
    assert results["schema"] == S.SCHEMA and results["dry_run"] is True
    assert results["device"]["type"] == "cpu"
    assert set(results["versions"]) == {"python", "torch", "triton", "transformers", "fla-core", "flash-attn"}
    assert results["plan"] == json.loads(json.dumps(dataclasses.asdict(S.DRY)))
    assert results["errors"] == 0
    assert results["ceilings"]["copy_gbps"] > 0 and results["ceilings"]["matmul_tflops"] > 0


def check_kernel_cases(dry_run: tuple) -> None:
    results, _, _ = dry_run
    kernels, ceil = results["kernels"], results["ceilings"]
    assert not [e for e in kernels if "error" in e]
    seen = {(e["op"], e["method"], e["mode"]) for e in kernels if "ms" in e}
    skipped = {(e["op"], e["method"], e["mode"]): e.get("skipped") for e in kernels if "ms" not in e}
    for op in W.OPS:
        modes = ("step",) if op in W.STEP_OPS else ("fwd", "fwd+bwd")
        has_kernel = W.backend_unavailable_reason("triton", torch.device("cpu"), allow_interpreter=True, op=op) is None
        backends = ("eager", "compile", "triton") if INTERPRETER and has_kernel else ("eager", "compile")
        for mode in modes:
            for backend in backends:
                assert (op, backend, mode) in seen, (op, backend, mode)
            if INTERPRETER and not has_kernel:  # an op without a kernel is recorded as skipped, with the reason
                assert "no Triton kernel" in str(skipped.get((op, "triton", mode))), (op, mode, skipped)
    for e in kernels:
        if "ms" not in e:
            continue
        assert e["ms"] > 0 and e["runs"] >= 1 and e["flops"] > 0 and e["bytes"] > 0
        assert close(e["tflops"], e["flops"] / e["ms"] / 1e9) and close(e["gbps"], e["bytes"] / e["ms"] / 1e6)
        t_flops, t_bytes = e["flops"] / ceil["matmul_tflops"] / 1e9, e["bytes"] / ceil["copy_gbps"] / 1e6
        assert close(e["floor_ms"], max(t_flops, t_bytes))
        assert e["bound"] == ("compute" if t_flops >= t_bytes else "memory")
        assert close(e["frac_of_floor"], e["floor_ms"] / e["ms"], rel=5e-3)
        if not e["peer"] and e["method"] != "eager":  # same fp32 inputs as the eager reference
            assert e["rel_err_vs_eager"] < 1e-3, e
    compiled = [e for e in kernels if e["method"] == "compile"]
    assert compiled and all(e["compile_backend"] == "eager" for e in compiled)
    assert {(e["op"], e["mode"]) for e in compiled} == {(e["op"], e["mode"]) for e in kernels if e["method"] == "eager"}


def check_deep_memory_cases(dry_run: tuple) -> None:
    """The deep op (issue #7) runs beside the linear op at the same (B, T, H, d, C), with its own FLOP and byte
    counts: more than the linear op's (W1 and W2 on top of the adaptive rows), less than 2.5x at h = d."""
    results, markdown, _ = dry_run
    kernels = results["kernels"]
    (shape,) = S.DRY.deep_titans_shapes
    (step_shape,) = S.DRY.deep_titans_step_shapes
    linear_shape = {k: v for k, v in shape.items() if k != "h"}
    assert linear_shape in S.DRY.titans_shapes
    by_key = {(e["op"], e["method"], e["mode"]): e for e in kernels
              if e["shape"] in (shape, step_shape, linear_shape)}
    for mode in ("fwd", "fwd+bwd"):
        deep, linear = by_key[("titans_deep_memory", "eager", mode)], by_key[("titans_memory", "eager", mode)]
        assert deep["shape"] == shape and linear["shape"] == linear_shape
        args = (shape["B"], shape["T"], shape["H"], shape["d"], shape["h"], shape["C"])
        assert deep["flops"] == W.deep_titans_flops(*args, backward=mode == "fwd+bwd")
        assert deep["bytes"] == W.deep_titans_bytes(*args, elt=4, backward=mode == "fwd+bwd")  # fp32 dry run
        assert linear["flops"] < deep["flops"] < 2.5 * linear["flops"]
        assert linear["bytes"] < deep["bytes"] < 2.5 * linear["bytes"]
        assert by_key[("titans_deep_memory", "compile", mode)]["rel_err_vs_eager"] < 1e-5
        deep_kernel = W.backend_unavailable_reason("triton", torch.device("cpu"), allow_interpreter=True,
                                                   op="titans_deep_memory") is None
        if INTERPRETER and deep_kernel:
            assert by_key[("titans_deep_memory", "triton", mode)]["rel_err_vs_eager"] < 1e-4
    step = by_key[("titans_deep_memory_step", "eager", "step")]
    assert step["shape"] == step_shape and step["stat"] == "median" and step["ms"] > 0
    assert step["flops"] == W.deep_titans_step_flops(*(step_shape[k] for k in ("B", "H", "d", "h", "C")))
    assert f"| titans_deep_memory | eager | fwd+bwd | {S.shape_label(shape)} |" in markdown
    assert f"| titans_deep_memory_step | eager | step | {S.shape_label(step_shape)} |" in markdown


def check_peers_recorded_explicitly(dry_run: tuple) -> None:
    results, markdown, _ = dry_run
    peers = {(e["method"], e["mode"]): e for e in results["kernels"] if e["peer"]}
    for mode in ("fwd", "fwd+bwd"):
        for method, module in (("fla_chunk_gated_delta_rule", "fla"), ("flash_attn", "flash_attn")):
            entry = peers[(method, mode)]
            if importlib.util.find_spec(module) is None:
                assert entry["skipped"].startswith("not installed"), entry
            else:
                assert "ms" in entry or "error" in entry or "skipped" in entry
        assert peers[("sdpa_flash", mode)]["ms"] > 0
        assert peers[("ffn_swiglu", mode)]["ms"] > 0
    if importlib.util.find_spec("fla") is None:
        assert "skipped: not installed (fla-core" in markdown


def check_model_level(dry_run: tuple) -> None:
    results, _, _ = dry_run
    model, plan = results["model"], S.DRY
    params = model["parameters"]
    assert set(params) == set(W.MODEL_NAMES)
    for name in W.MODEL_NAMES:  # one parameter budget (hope/presets.py)
        assert abs(params[name] - params["transformer++"]) <= 0.1 * params["transformer++"], params
    train = {(e["model"], e["T"]): e for e in model["train"]}
    assert set(train) == {(m, T) for m in W.MODEL_NAMES for T, _ in plan.train}
    for e in train.values():
        assert close(e["tokens_per_s"], e["B"] * e["T"] / e["ms"] * 1e3)
    assert {(e["model"], e["prompt"]) for e in model["prefill"] if e["tokens_per_s"] > 0} == {
        (m, p) for m in W.MODEL_NAMES for p in plan.decode_prompts}
    decode = {(e["model"], e["prompt"], e["batch"]): e for e in model["decode"]}
    assert set(decode) == {(m, p, b) for m in W.MODEL_NAMES for p in plan.decode_prompts for b in plan.decode_batches}
    for (name, prompt, batch), e in decode.items():
        assert close(e["tokens_per_s"], batch / e["ms"] * 1e3)
        assert e["cache_bytes"] > 0
    short, long_ = plan.decode_prompts
    # Hope's state does not grow with the context; a KV cache does.
    assert decode[("hope", short, 1)]["cache_bytes"] == decode[("hope", long_, 1)]["cache_bytes"]
    assert decode[("transformer++", long_, 1)]["cache_bytes"] > decode[("transformer++", short, 1)]["cache_bytes"]
    assert decode[("hope", short, 2)]["cache_bytes"] == 2 * decode[("hope", short, 1)]["cache_bytes"]


def check_goals_and_markdown(dry_run: tuple) -> None:
    results, markdown, _ = dry_run
    goals = {g["id"]: g for g in results["goals"]}
    assert set(goals) == {"train_ref", "train_long", "titans_vs_fla", "titans_vs_eager", "titans_bf16", "cms_matmul",
                          "cms_bandwidth", "decode_flat", "decode_speed", "deep_vs_linear"}
    assert all(g["status"] in S.STATUSES for g in goals.values())
    # The deep goal pairs the two Triton fwd+bwd timings (the interpreter's in the dry run, when it is on).
    timed = {e["op"]: e["ms"] for e in results["kernels"]
             if e["method"] == "triton" and e["mode"] == "fwd+bwd" and "ms" in e}
    kernels = all(W.backend_unavailable_reason("triton", torch.device("cpu"), allow_interpreter=True, op=op) is None
                  for op in ("titans_memory", "titans_deep_memory"))
    if INTERPRETER and kernels:
        deep = timed["titans_deep_memory"] / timed["titans_memory"]
        assert close(goals["deep_vs_linear"]["values"]["ratios"][S.shape_label(S.DRY.deep_titans_shapes[0])], deep)
        assert goals["deep_vs_linear"]["status"] == ("hit" if deep <= 2.5 else "miss")
    else:
        assert "titans_deep_memory" not in timed and goals["deep_vs_linear"]["status"] == "not measured"
    train = {(e["model"], e["T"]): e["tokens_per_s"] for e in results["model"]["train"]}
    T = S.DRY.train[0][0]
    ratio = train[("hope", T)] / train[("transformer++", T)]
    assert close(goals["train_ref"]["values"]["ratio"], ratio)
    assert goals["train_ref"]["status"] == ("hit" if ratio >= 0.7 else "miss")
    if importlib.util.find_spec("fla") is None:
        assert goals["titans_vs_fla"]["status"] == "not measured"
    assert goals["titans_bf16"]["status"] == "not measured"  # the dry run is fp32
    assert markdown.startswith("# Hope benchmark suite")
    assert "Dry run on CPU" in markdown
    for heading in ("## Ceilings", "## Goals", "## Kernels and peers", "## Model level"):
        assert heading in markdown
    for g in goals.values():
        assert f"| {g['goal']} | {g['target']} | {g['measured']} | **{g['status']}** |" in markdown
    for name in W.MODEL_NAMES:
        assert f"| {name} |" in markdown


def test_failing_case_is_recorded_and_the_run_continues(tmp_path, monkeypatch) -> None:
    """A kernel that raises is recorded as an error and the run goes on; an op without a kernel is recorded as
    skipped with the reason. The test pretends titans_memory_step has a kernel that fails, and that cms_level_step
    has none (hope_kernels.cms.HAS_TRITON patched), so it does not depend on which ops ship a kernel."""
    import hope_kernels.cms

    real_function, real_reason = W.op_function, W.backend_unavailable_reason

    def op_function(op, backend, compile_backend="inductor"):
        if backend == "triton":
            raise RuntimeError("titans Triton kernel does not fit this GPU (shared memory)\nsecond line")
        return real_function(op, backend, compile_backend)

    def reason(backend, device, allow_interpreter=False, op=None):
        if backend == "triton" and op == "titans_memory_step":
            return None
        return real_reason(backend, device, allow_interpreter, op)

    monkeypatch.setattr(W, "op_function", op_function)
    monkeypatch.setattr(W, "backend_unavailable_reason", reason)
    monkeypatch.setattr(hope_kernels.cms, "HAS_TRITON", False)
    argv = ["--dry-run", "--out-dir", str(tmp_path), "--sections", "kernels", "--ops",
            "titans_memory_step,cms_level_step", "--methods", "eager,triton"]
    assert S.main(argv) == 0
    (name,) = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    with open(tmp_path / name) as f:
        results = json.load(f)
    by_method = {(e["op"], e["method"]): e for e in results["kernels"]}
    assert set(by_method) == {(op, m) for op in ("titans_memory_step", "cms_level_step") for m in ("eager", "triton")}
    assert by_method[("titans_memory_step", "triton")]["error"] == (
        "RuntimeError: titans Triton kernel does not fit this GPU (shared memory)")
    assert "no Triton kernel" in by_method[("cms_level_step", "triton")]["skipped"]
    for op in ("titans_memory_step", "cms_level_step"):
        assert "ms" not in by_method[(op, "triton")]
        assert by_method[(op, "eager")]["ms"] > 0
    assert results["errors"] == 1
    assert not results["model"]["train"] and not results["ceilings"]
    with open(tmp_path / name.replace(".json", ".md")) as f:
        assert "ERROR RuntimeError: titans Triton kernel does not fit" in f.read()


def _cms_shape(C: int) -> dict:
    return next(s for s in S.FULL.cms_shapes if s["C"] == C)


def _figures(train: dict, titans: tuple, cms_frac: float, decode: dict, deep: Optional[dict] = None,
             cms_floor: float = 0.7) -> dict:
    """A results dict of the full plan with the given figures: train {(model, T): tokens/s}, titans (our fwd+bwd
    ms, FLA's, the eager reference's, our bf16 relative error against it), the CMS fraction of matmul at C = 512
    and its fraction of the copy rate at C = 16 (cms_floor; the C = 128 entry counts for neither goal), decode
    {(model, prompt, batch): ms}, and the deep op's Triton fwd+bwd entry fields (e.g. {"ms": 50.0} or
    {"error": ...}) at the full plan's deep shape, or None for no deep entry."""
    shape = S.FULL.titans_shapes[0]
    kernels = [] if deep is None else [
        {"op": "titans_deep_memory", "method": "triton", "mode": "fwd+bwd", "shape": S.FULL.deep_titans_shapes[0],
         **deep}]
    kernels += [
        {"op": "titans_memory", "method": "triton", "mode": "fwd+bwd", "shape": shape, "ms": titans[0],
         "dtype": "bfloat16", "rel_err_vs_eager": titans[3]},
        {"op": "titans_memory", "method": "fla_chunk_gated_delta_rule", "mode": "fwd+bwd", "shape": shape,
         "ms": titans[1]},
        {"op": "titans_memory", "method": "eager", "mode": "fwd+bwd", "shape": shape, "ms": titans[2]},
        {"op": "cms_level", "method": "triton", "mode": "fwd", "shape": _cms_shape(512), "ms": 1.0,
         "frac_of_matmul": cms_frac, "frac_of_copy": 0.9},
        {"op": "cms_level", "method": "triton", "mode": "fwd", "shape": _cms_shape(16), "ms": 1.0,
         "frac_of_matmul": 0.01, "frac_of_copy": cms_floor},
        {"op": "cms_level", "method": "triton", "mode": "fwd", "shape": _cms_shape(128), "ms": 1.0,
         "frac_of_matmul": 0.01, "frac_of_copy": 0.01},
    ]
    return {
        "plan": dataclasses.asdict(S.FULL),
        "kernels": kernels,
        "model": {
            "train": [{"model": m, "T": T, "tokens_per_s": v} for (m, T), v in train.items()],
            "decode": [{"model": m, "prompt": p, "batch": b, "ms": ms, "tokens_per_s": b / ms * 1e3}
                       for (m, p, b), ms in decode.items()],
        },
    }


def test_goal_rules_on_known_figures() -> None:
    results = _figures(
        train={("hope", 4096): 70.0, ("transformer++", 4096): 100.0, ("hope", 16384): 101.0,
               ("transformer++", 16384): 100.0},
        titans=(20.0, 8.0, 400.0, 1e-2),
        cms_frac=0.5,
        decode={("hope", 1024, 1): 10.0, ("hope", 32768, 1): 11.0, ("transformer++", 32768, 1): 23.0,
                ("hope", 1024, 64): 10.0, ("hope", 32768, 64): 10.5},
        deep={"ms": 50.0},  # against the linear op's 20 ms at the same shape
    )
    goals = {g["id"]: g for g in S.evaluate_goals(results)}
    assert goals["deep_vs_linear"]["status"] == "hit"  # 2.5x exactly
    label = S.shape_label(S.FULL.deep_titans_shapes[0])
    assert goals["deep_vs_linear"]["values"]["ratios"] == {label: 2.5}
    assert goals["deep_vs_linear"]["measured"] == f"{label}: 2.50x"
    assert goals["train_ref"]["status"] == "hit"  # 0.70 exactly
    assert goals["train_long"]["status"] == "hit"  # 1.01 > 1
    assert goals["titans_vs_fla"]["status"] == "hit"  # 2.5x exactly
    assert goals["titans_vs_eager"]["status"] == "hit"  # 20x exactly
    assert goals["titans_bf16"]["status"] == "hit"  # 1e-2 exactly
    assert goals["cms_matmul"]["status"] == "hit"  # 0.50 exactly, at C = 512 only
    assert set(goals["cms_matmul"]["values"]["fractions"]) == {f"fwd {S.shape_label(_cms_shape(512))}"}
    assert goals["cms_bandwidth"]["status"] == "hit"  # 0.70 exactly, at C = 16 only
    assert set(goals["cms_bandwidth"]["values"]["fractions"]) == {f"fwd {S.shape_label(_cms_shape(16))}"}
    assert goals["decode_flat"]["status"] == "hit"  # 1.10 and 1.05
    # Transformer++ at batch 64 was not measured, so only batch 1 counts: 23 ms against 11 ms per token.
    assert goals["decode_speed"]["status"] == "hit"
    assert set(goals["decode_speed"]["values"]["ratios"]) == {"1"}
    assert close(goals["decode_speed"]["values"]["ratios"]["1"], 23.0 / 11.0)


def test_goal_rules_miss_and_not_measured() -> None:
    results = _figures(
        train={("hope", 4096): 69.0, ("transformer++", 4096): 100.0, ("hope", 16384): 100.0,
               ("transformer++", 16384): 100.0},
        titans=(20.1, 8.0, 400.0, 1.1e-2),
        cms_frac=0.49,
        decode={("hope", 1024, 1): 10.0, ("hope", 32768, 1): 11.2, ("transformer++", 32768, 1): 15.0},
        deep={"ms": 50.3},  # 2.515x the linear op's 20 ms
        cms_floor=0.69,
    )
    goals = {g["id"]: g for g in S.evaluate_goals(results)}
    assert [goals[k]["status"] for k in ("train_ref", "train_long", "titans_vs_fla", "titans_vs_eager", "titans_bf16",
                                         "cms_matmul", "cms_bandwidth", "decode_flat", "decode_speed",
                                         "deep_vs_linear")] == ["miss"] * 10
    assert close(goals["decode_speed"]["values"]["ratios"]["1"], (1 / 11.2) / (1 / 15.0))
    empty = {"plan": dataclasses.asdict(S.FULL), "kernels": [], "model": {"train": [], "decode": []}}
    assert {g["status"] for g in S.evaluate_goals(empty)} == {"not measured"}


def test_deep_goal_not_measured_says_why() -> None:
    """The deep goal is "not measured" whenever either side lacks a timing, and says which side and why: the deep
    kernel may not fit shared memory on the GPU (benchmarks/NOTES.md), and that must show in the goal row."""
    figures = dict(train={}, titans=(20.0, 10.0, 400.0, 1e-2), cms_frac=0.5, decode={})
    label = S.shape_label(S.FULL.deep_titans_shapes[0])

    def deep_goal(results: dict) -> dict:
        return {g["id"]: g for g in S.evaluate_goals(results)}["deep_vs_linear"]

    g = deep_goal(_figures(**figures))  # no deep entry at all
    assert g["status"] == "not measured" and g["measured"] == "not measured: no deep Triton fwd+bwd timing"
    g = deep_goal(_figures(**figures, deep={"error": "RuntimeError: out of shared memory"}))
    assert g["status"] == "not measured" and g["values"]["ratios"] == {}
    assert g["measured"] == f"{label}: deep ERROR RuntimeError: out of shared memory"
    # A deep timing without the linear op's (its case failed) measures nothing either.
    results = _figures(**figures, deep={"ms": 30.0})
    linear = next(e for e in results["kernels"] if e["op"] == "titans_memory" and e["method"] == "triton")
    del linear["ms"]
    linear["skipped"] = "time budget exhausted (--budget-s)"
    g = deep_goal(results)
    assert g["status"] == "not measured"
    assert g["measured"] == f"{label}: linear skipped: time budget exhausted (--budget-s)"
    # The linear op timed at another shape only does not pair with the deep op.
    results = _figures(**figures, deep={"ms": 30.0})
    linear = next(e for e in results["kernels"] if e["op"] == "titans_memory" and e["method"] == "triton")
    linear["shape"] = S.FULL.titans_shapes[1]
    assert deep_goal(results)["measured"] == f"{label}: linear not run"


def test_full_plan_matches_the_340m_model() -> None:
    """The GPU plan times the kernels at the shapes the 340M models run (so kernel and model figures agree),
    within the Titans kernel's limits, and the three models share one parameter budget."""
    from hope.presets import count_parameters

    hope = W.model_config("hope", S.FULL.model_size)
    assert (hope.hidden_size, hope.num_hidden_layers) == (1024, 24)
    for shape in S.FULL.titans_shapes + S.FULL.titans_step_shapes:
        assert shape["H"] == hope.num_heads and shape["C"] == hope.chunk_size and shape["d"] in (hope.head_dim, 128)
    learning = [(size, width) for size, width in zip(hope.cms_chunk_sizes, hope.cms_hidden_size) if size]
    for shape in S.FULL.cms_shapes + S.FULL.cms_step_shapes:
        assert shape["D"] == hope.hidden_size and shape["F"] in {width for _, width in learning}
    # every learning level of the preset at its own width, and issue #13's compute-bound chunk sizes (its >= 50%
    # matmul goal)
    pairs = {(s["C"], s["F"]) for s in S.FULL.cms_shapes}
    assert set(learning) <= pairs and {512, 2048} <= {C for C, _ in pairs}
    # Issue #7's shape: the 340M model with memory_depth=2 (h defaults to the head dim), paired with a linear shape.
    deep = W.model_config("hope", S.FULL.model_size, memory_depth=2)
    assert S.FULL.deep_titans_shapes == [dict(B=8, T=4096, H=16, d=64, h=64, C=64)]
    for shape in S.FULL.deep_titans_shapes + S.FULL.deep_titans_step_shapes:
        assert (shape["H"], shape["d"], shape["h"], shape["C"]) == (deep.num_heads, deep.head_dim, deep.memory_hidden,
                                                                    deep.chunk_size)
    for shape in S.FULL.deep_titans_shapes:
        assert {k: v for k, v in shape.items() if k != "h"} in S.FULL.titans_shapes
    assert [T for T, _ in S.FULL.train] == [4096, 16384] and S.FULL.decode_prompts == [1024, 32768]
    assert S.FULL.decode_batches == [1, 64]
    budget = count_parameters(W.model_config("transformer++", S.FULL.model_size))
    for name in ("hope", "hope-attention"):
        assert abs(count_parameters(W.model_config(name, S.FULL.model_size)) - budget) <= 0.02 * budget


def test_cms_counts_skip_the_unread_last_update() -> None:
    """Timed without a final state, a CMS level skips the last segment's inner step (nobody reads it): the FLOP
    and byte counts must not credit the kernel with it (at C = 2048, T = 4096 that is half the inner work)."""
    assert W.cms_learning(4096, 2048) == (2048, 1)
    assert W.cms_learning(4096, 16) == (4080, 255)
    assert W.cms_learning(10, 4) == (8, 2)  # segments 4, 4, 2: the last one only reads
    D, F = 8, 4
    read_only = W.cms_flops(1, 4, D, F, 4)  # one segment: nothing learns
    assert read_only == 4 * (6 * D * F + 2 * D * D)
    assert W.cms_flops(1, 8, D, F, 4) == 2 * read_only + 4 * 8 * D * F
    assert W.cms_bytes(1, 4, D, F, 4, elt=2) == 2 * 4 * D * 2 + (3 * F * D + D * D) * 2  # no θ traffic
