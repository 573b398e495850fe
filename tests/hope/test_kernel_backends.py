"""Model level: kernel_backend="triton" (Triton's interpreter on CPU) gives the logits, loss and parameter
gradients of kernel_backend="torch", for every op that ships a Triton kernel, and really dispatches to it."""
from __future__ import annotations

import pytest
import torch

import hope_kernels.cms as cms_kernels
import hope_kernels.deep_titans as deep_titans_kernels
import hope_kernels.titans as titans_kernels
from tests.hope.utils_hope import cache_of, random_ids, tiny_model, variant_config

pytest.importorskip("triton", reason="the Triton backend needs the triton package")

F32 = torch.float32
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # CPU tensors run in Triton's interpreter (conftest)
CASES = {
    # name: (variant overrides, ops it needs)
    "cms_sequential": (dict(mixer="attention", cms_variant="sequential"), ["cms"]),
    "cms_independent": (dict(mixer="attention", cms_variant="independent"), ["cms"]),
    # The Titans memories at the model's defaults (unit values, retention toward the initial memories, the deep
    # memory's curvature guard), with plain-FFN CMS levels so that only their kernels are in play.
    "hope": (dict(cms_chunk_sizes=[None]), ["titans"]),
    "hope_deep": (dict(cms_chunk_sizes=[None], memory_depth=2, memory_hidden=12), ["deep_titans"]),  # h != d = 8
    # The whole Hope layer at the model's defaults: the Titans memory and learning CMS levels, both kernels at once.
    "hope_full": (dict(), ["titans", "cms"]),
}
KERNELS = {"titans": titans_kernels, "deep_titans": deep_titans_kernels, "cms": cms_kernels}


@pytest.fixture
def dispatched(monkeypatch) -> list:
    """Every (op, backend) the ops' dispatchers choose while the test runs."""
    seen = []
    for module in KERNELS.values():
        def recording(*args, _resolve=module.resolve_backend, **kwargs):
            choice = _resolve(*args, **kwargs)
            seen.append((kwargs["op"], choice))
            return choice

        monkeypatch.setattr(module, "resolve_backend", recording)
    return seen


def _models(name: str):
    overrides, ops = CASES[name]
    missing = [op for op in ops if not KERNELS[op].HAS_TRITON]
    if missing:
        pytest.skip(f"no Triton kernel yet for {missing}")
    return tuple(tiny_model(variant_config("hope", **overrides, kernel_backend=b), dtype=F32).to(DEV)
                 for b in ("torch", "triton"))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("name", list(CASES))
def test_triton_equals_torch_logits_loss_gradients(name, dispatched):
    reference, kernel = _models(name)
    ids = random_ids(2, 13).to(DEV)
    mask = torch.ones(2, 13, dtype=torch.long, device=DEV)
    mask[1, 10:] = 0  # right padding in one row
    outputs = []
    for model in (reference, kernel):
        model.train()
        dispatched.clear()
        out = model(ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        outputs.append(out)
    assert _rel(outputs[1].logits, outputs[0].logits) < 1e-4
    assert abs(outputs[1].loss.item() - outputs[0].loss.item()) < 1e-4 * abs(outputs[0].loss.item())
    for (pname, p_ref), (_, p_ker) in zip(reference.named_parameters(), kernel.named_parameters()):
        assert p_ref.grad is not None and p_ker.grad is not None, pname
        assert _rel(p_ker.grad, p_ref.grad) < 1e-4, pname
    assert set(dispatched) == {(op, "triton") for op in CASES[name][1]}


@pytest.mark.parametrize("name", list(CASES))
def test_triton_decode_equals_torch(name, dispatched):
    reference, kernel = _models(name)
    ids = random_ids(2, 9).to(DEV)
    logits, generated = [], []
    with torch.no_grad():
        for model in (reference, kernel):
            dispatched.clear()
            out = model(ids[:, :6], use_cache=True)
            cache, steps = cache_of(out), [out.logits]
            for t in range(6, 9):
                out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
                steps.append(out.logits)
            logits.append(torch.cat(steps, dim=1))
            generated.append(model.generate(ids[:, :6], attention_mask=torch.ones_like(ids[:, :6]), max_new_tokens=3,
                                            do_sample=False, pad_token_id=0, eos_token_id=None))
    assert _rel(logits[1], logits[0]) < 1e-4
    assert torch.equal(generated[1], generated[0])  # greedy decoding picks the same tokens
    assert set(dispatched) == {(op, "triton") for op in CASES[name][1]}


@pytest.mark.parametrize("memory_depth", [1, 2])
def test_titans_mixer_hands_the_kernel_one_dtype_under_autocast(monkeypatch, memory_depth):
    """CUDA autocast runs F.normalize in fp32 while the rest of the mixer stays bf16, so q would reach the kernel
    fp32 and a bf16 (a ValueError in a Triton op). CPU autocast keeps both bf16, so the CUDA policy is imitated
    by an upcasting normalize; the mixer must hand the memory op q and a of one dtype (checked by a spy)."""
    import hope.layers.titans_mixer as mixer_module

    normalize = mixer_module.F.normalize
    monkeypatch.setattr(mixer_module.F, "normalize", lambda x, *args, **kw: normalize(x.float(), *args, **kw))
    seen = []
    name = "titans_memory" if memory_depth == 1 else "titans_deep_memory"
    op = getattr(mixer_module, name)

    def spy(q, a, *args, **kwargs):
        seen.append((q.dtype, a.dtype))
        return op(q, a, *args, **kwargs)

    monkeypatch.setattr(mixer_module, name, spy)
    model = tiny_model(variant_config("hope", memory_depth=memory_depth), dtype=torch.bfloat16).to(DEV)
    logits = model(random_ids(2, 9)).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    assert len(seen) == model.config.num_hidden_layers and all(q == a == torch.bfloat16 for q, a in seen), seen
