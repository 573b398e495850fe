"""What the benchmarks run, shared by the pytest-benchmark suites (`make bench`) and `gpu_suite.py`.

* Op cases: `op_case(op, backend, shape, mode, dtype, device)` returns a zero-argument callable that runs one
  op once (forward, forward + backward, or one decode token) through one backend:
    eager    the PyTorch reference (`hope_kernels.<op>.reference`)
    compile  the same reference under torch.compile: for the chunked ops only the per-chunk piece is compiled
             (`_segment` / `_chunk_piece`; compiling the whole function would unroll the Python chunk loop,
             minutes of compile at long T), for the decode steps the whole step function
    triton   the Triton kernels (`chunk.py`, `step.py`); compiled on CUDA, Triton's interpreter on CPU
* FLOP and byte counts of every op and peer (`*_flops`, `*_bytes`): matmul FLOPs of each algorithm (elementwise
  work not counted) and the fewest bytes it must move through device memory.
* Models: `model_config(name, size)` for Hope, Hope-Attention and Transformer++ at one parameter budget
  (`hope/presets.py`), training-step and decode-step callables.

Shapes use the ops' own layouts: Titans (B, T, H, d) with chunk size C; CMS (B, T, D) with hidden F and chunk C;
decode steps drop T.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

OPS = ("titans_memory", "cms_level", "titans_memory_step", "cms_level_step")
OP_BACKENDS = ("eager", "compile", "triton")
STEP_OPS = ("titans_memory_step", "cms_level_step")
CMS_ETA_MAX = 0.1
MODEL_NAMES = ("hope", "hope-attention", "transformer++")


# ------------------------------------------------------------------------------------------- backends


def backend_unavailable_reason(backend: str, device: torch.device, allow_interpreter: bool = False) -> Optional[str]:
    """Why `backend` cannot run on `device` here, or None when it can.

    Triton kernels need CUDA; on CPU they run only in Triton's interpreter (TRITON_INTERPRET=1), which is a
    correctness tool, far too slow to time: `allow_interpreter` callers (the GPU suite's dry run, which only
    exercises code paths) accept it, benchmarks do not.
    """
    from hope_kernels._dispatch import triton_available, triton_interpreting

    if backend not in OP_BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {OP_BACKENDS}")
    if backend == "triton":
        if not triton_available():
            return "triton is not installed"
        if device.type != "cuda":
            if not allow_interpreter:
                return "no CUDA GPU: Triton kernels are benchmarked only compiled on CUDA"
            if not triton_interpreting():
                return "CPU tensors and TRITON_INTERPRET=1 is unset: the Triton kernels cannot run on them"
    return None


_COMPILED: dict[tuple[str, str], Callable] = {}


def compiled(fn: Callable, backend: str = "inductor") -> Callable:
    """torch.compile(fn) once per (function, compile backend), static shapes; the recompile limit is raised so
    that each shape and grad mode of a benchmark grid gets its own graph instead of falling back to eager."""
    key = (f"{fn.__module__}.{fn.__qualname__}", backend)
    if key not in _COMPILED:
        for knob in ("cache_size_limit", "recompile_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, max(64, getattr(torch._dynamo.config, knob)))
        _COMPILED[key] = torch.compile(fn, dynamic=False, backend=backend)
    return _COMPILED[key]


@contextlib.contextmanager
def _patched(module, name: str, compile_backend: str) -> Iterator[None]:
    """Swap `module.name` for its compiled version for the duration of one call."""
    original = getattr(module, name)
    setattr(module, name, compiled(original, compile_backend))
    try:
        yield
    finally:
        setattr(module, name, original)


def op_function(op: str, backend: str, compile_backend: str = "inductor") -> Callable:
    """The callable that runs `op` through `backend`, with the reference's signature."""
    if op not in OPS:
        raise ValueError(f"op {op!r} is not one of {OPS}")
    if op.startswith("titans"):
        import hope_kernels.titans.reference as ref

        piece = "_segment"
        eager = ref.titans_memory_step_reference if op in STEP_OPS else ref.titans_memory_reference
    else:
        import hope_kernels.cms.reference as ref

        piece = "_chunk_piece"
        eager = ref.cms_level_step_reference if op in STEP_OPS else ref.cms_level_reference
    if backend == "eager":
        return eager
    if backend == "compile":
        if op in STEP_OPS:
            return compiled(eager, compile_backend)

        def run_compiled(*args, **kwargs):
            with _patched(ref, piece, compile_backend):
                return eager(*args, **kwargs)

        return run_compiled
    if backend == "triton":
        if op == "titans_memory":
            from hope_kernels.titans.chunk import titans_memory_triton as fn
        elif op == "titans_memory_step":
            from hope_kernels.titans.step import titans_memory_step_triton as fn
        elif op == "cms_level":
            from hope_kernels.cms.chunk import cms_level_triton as fn
        else:
            from hope_kernels.cms.step import cms_level_step_triton as fn
        return fn
    raise ValueError(f"backend {backend!r} is not one of {OP_BACKENDS}")


# ------------------------------------------------------------------------------------------- inputs


def titans_kwargs(C: int) -> dict:
    """The model's Titans settings: momentum, DGD, l2 objective, self targets, every row adaptive."""
    return dict(chunk_size=C, eta_max=0.1, momentum=True, dgd=True, objective="l2", memory_target="self",
                adaptive=("k", "v", "eta", "alpha"))


def cms_kwargs(C: int) -> dict:
    return dict(chunk_size=C, eta_max=CMS_ETA_MAX, objective="l2")


def titans_inputs(B: int, T: int, H: int, d: int, dtype: torch.dtype, device, requires_grad: bool = False,
                  seed: int = 0) -> list[Tensor]:
    """[q (B, T, H, d) unit rows, a (B, T, H, d), z0 (H, 3d+2, d), b_eta, b_alpha, momentum_logit (H,)]; q and a
    in `dtype`, the parameters fp32 (as in the model). Random data: zeros would hide unwritten outputs."""
    from hope_kernels.titans.reference import memory_rows

    g = torch.Generator(device="cpu").manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, d, generator=g), dim=-1)
    a = torch.randn(B, T, H, d, generator=g)
    z0 = torch.randn(H, memory_rows(d), d, generator=g) / math.sqrt(d)
    b_eta = -1.0 + 0.3 * torch.randn(H, generator=g)
    b_alpha = 4.0 + 0.3 * torch.randn(H, generator=g)
    mlog = 1.0 + 0.3 * torch.randn(H, generator=g)
    out = [q.to(dtype), a.to(dtype), z0, b_eta, b_alpha, mlog]
    return [t.to(device).requires_grad_(requires_grad) for t in out]


def cms_inputs(B: int, T: int, D: int, Fh: int, dtype: torch.dtype, device, requires_grad: bool = False,
               seed: int = 0) -> list[Tensor]:
    """[z (B, T, D) RMS 0.4, w_gate (F, D), w_up (F, D), w_down (D, F), p_v (D, D), w_eta (D,), b_eta ()], all
    in `dtype`."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    z = torch.randn(B, T, D, generator=g)
    z = 0.4 * z / z.pow(2).mean(-1, keepdim=True).sqrt()
    xs = [
        z,
        torch.randn(Fh, D, generator=g) / D**0.5,
        torch.randn(Fh, D, generator=g) / D**0.5,
        torch.randn(D, Fh, generator=g) / Fh**0.5,
        torch.randn(D, D, generator=g) / D**0.5,
        torch.randn(D, generator=g) / D**0.5,
        torch.tensor(-2.0),
    ]
    return [x.to(device=device, dtype=dtype).requires_grad_(requires_grad) for x in xs]


def _decode_state(op: str, shape: dict, dtype: torch.dtype, device) -> tuple[list[Tensor], object]:
    """Inputs of one decode token and the state after a prompt of C + 3 tokens (mid-chunk, as in decoding),
    made by the chunked reference. Returns (args of the step op, state)."""
    from hope_kernels.cms.reference import cms_level_reference
    from hope_kernels.titans.reference import titans_memory_reference

    C, prompt = shape["C"], shape["C"] + 3
    with torch.no_grad():
        if op == "titans_memory_step":
            B, H, d = shape["B"], shape["H"], shape["d"]
            xs = titans_inputs(B, prompt + 1, H, d, dtype, device)
            _, state = titans_memory_reference(xs[0][:, :prompt], xs[1][:, :prompt], *xs[2:], **titans_kwargs(C),
                                               output_final_state=True)
            return [xs[0][:, prompt], xs[1][:, prompt], *xs[2:]], state
        B, D, Fh = shape["B"], shape["D"], shape["F"]
        xs = cms_inputs(B, prompt + 1, D, Fh, dtype, device)
        _, state = cms_level_reference(xs[0][:, :prompt], *xs[1:], **cms_kwargs(C), output_final_state=True)
        return [xs[0][:, prompt], *xs[1:]], state


def op_case(op: str, backend: str, shape: dict, mode: str, dtype: torch.dtype, device,
            compile_backend: str = "inductor") -> Callable[[], Tensor]:
    """A callable that runs `op` once through `backend` on fixed random inputs and returns its output.

    shape: Titans {B, T, H, d, C}, CMS {B, T, D, F, C}; the decode steps take the same keys without T.
    mode: "fwd", "fwd+bwd" (backward of sum(output * 1), gradients into every input) or, for the step ops,
    "step" (one decode token from a mid-chunk state, no autograd).
    """
    fn = op_function(op, backend, compile_backend)
    C = shape["C"]
    if op in STEP_OPS:
        if mode != "step":
            raise ValueError(f"{op} has only mode 'step', got {mode!r}")
        args, state = _decode_state(op, shape, dtype, device)
        kwargs = titans_kwargs(C) if op.startswith("titans") else cms_kwargs(C)

        def step() -> Tensor:
            with torch.no_grad():
                return fn(*args, state=state, **kwargs)[0]

        return step
    if mode not in ("fwd", "fwd+bwd"):
        raise ValueError(f"{op} has modes 'fwd' and 'fwd+bwd', got {mode!r}")
    backward = mode == "fwd+bwd"
    if op == "titans_memory":
        xs = titans_inputs(shape["B"], shape["T"], shape["H"], shape["d"], dtype, device, requires_grad=backward)
        kwargs = titans_kwargs(C)
    else:
        xs = cms_inputs(shape["B"], shape["T"], shape["D"], shape["F"], dtype, device, requires_grad=backward)
        kwargs = cms_kwargs(C)

    def run() -> Tensor:
        with torch.set_grad_enabled(backward):
            out = fn(*xs, **kwargs)[0]
            if backward:
                out.backward(torch.ones_like(out))
        return out.detach()

    return run


# ------------------------------------------------------------------------------------------- FLOPs and bytes
# FLOPs: matmul FLOPs of each algorithm (2 per multiply-add), elementwise work not counted. Bytes: the fewest
# bytes through device memory, each input read once and each output written once (plus, where the algorithm
# must stream it, the recurrent state), at `elt` bytes per activation element; states and sums are fp32.


def titans_flops(B: int, T: int, H: int, d: int, C: int, backward: bool = False, momentum: bool = True) -> float:
    """Chunked closed form per segment of C tokens with state rows R = 3d+2: reads of k, v, eta, alpha from Z_c,
    the C x C decay products, the reads o and the (R, d) state update; the backward recomputes the forward."""
    nseg = math.ceil(T / C)
    fwd = 14 * C * d * d + 6 * C * C * d + 2 * C**3 + 12 * d**3
    if not momentum:
        fwd -= 4 * C * d * d + 6 * d**3
    per = fwd + (108 * C * d * d + 20 * C * C * d + 6 * C**3 if backward else 0)
    return float(B * H * nseg * per)


def titans_bytes(B: int, T: int, H: int, d: int, C: int, elt: int = 2, backward: bool = False) -> float:
    """q, a in and o out, plus the fp32 state stream per segment (read Z_c, Z_s, S_s; write Z, S); the backward
    adds q, a, do in, dq, da out, the saved states and the gradient carry."""
    nseg = math.ceil(T / C)
    R = 3 * d + 2
    act = 3 * B * T * H * d * elt
    state = B * H * nseg * 5 * R * d * 4
    if backward:
        act += 4 * B * T * H * d * elt
        state += B * H * nseg * 7 * R * d * 4
    return float(act + state)


def titans_step_flops(B: int, H: int, d: int, C: int) -> float:
    """One token per (b, h): Z_c a (k, v, eta, alpha), the gradient X_c u kᵀ and the DGD term X_c k kᵀ over all
    R = 3d+2 rows (a mat-vec and an outer product each), and the read M q."""
    R = 3 * d + 2
    return float(B * H * (10 * R * d + 2 * d * d))


def titans_step_bytes(B: int, H: int, d: int, C: int, elt: int = 2) -> float:
    """Read Z_c, Z_t, S_t and write Z_t, S_t (fp32, (R, d) each per (b, h)); q, a in, o out."""
    R = 3 * d + 2
    return float(B * H * (5 * R * d * 4 + 3 * d * elt))


def cms_flops(B: int, T: int, D: int, F: int, C: int, backward: bool = False) -> float:
    """One level that learns on every token: read 6DF, inner gradients 8DF, target 2D^2 per token; the kernel's
    backward recomputes the forward and adds 32DF + 4D^2."""
    per_tok = 14 * D * F + 2 * D * D
    if backward:
        per_tok += 38 * D * F + 4 * D * D
    return float(B * T * per_tok)


def cms_bytes(B: int, T: int, D: int, F: int, C: int, elt: int = 2, backward: bool = False) -> float:
    """z in, y out, the parameters (3FD + D^2) in; the fp32 θ of each closed chunk out (and back in for the next
    chunk's read) per sequence. The backward adds dy in, dz out, the parameter gradients and a re-read of θ."""
    n_updates = T // C
    act = 2 * B * T * D * elt
    params = (3 * F * D + D * D) * elt
    theta = B * n_updates * 2 * 3 * F * D * 4
    if backward:
        return float(2 * act + 2 * params + 2 * theta)
    return float(act + params + theta)


def cms_step_flops(B: int, D: int, F: int, C: int) -> float:
    """One token: the read (6DF), the target (2D^2) and the inner-gradient mat-vecs and outer products (8DF)."""
    return float(B * (14 * D * F + 2 * D * D))


def cms_step_bytes(B: int, D: int, F: int, C: int, elt: int = 2) -> float:
    """Per sequence: read θ_c and the running sums and write the sums (fp32, 3FD each); P_v once."""
    return float(B * 3 * 3 * F * D * 4 + D * D * elt + 2 * B * D * elt)


def ffn_flops(B: int, T: int, D: int, F: int, C: Optional[int] = None, backward: bool = False) -> float:
    """A plain SwiGLU FFN of the same size (what a CMS level with C = None costs); backward = 2x forward."""
    return float(B * T * 6 * D * F * (3 if backward else 1))


def ffn_bytes(B: int, T: int, D: int, F: int, C: Optional[int] = None, elt: int = 2, backward: bool = False) -> float:
    act, params = 2 * B * T * D * elt, 3 * F * D * elt
    return float((act + params) * (2 if backward else 1))


def sdpa_flops(B: int, T: int, H: int, d: int, C: Optional[int] = None, backward: bool = False) -> float:
    """Causal attention: QKᵀ and PV over the lower triangle; the flash backward costs ~2.5x the forward."""
    return 2 * 2 * B * H * T * T * d / 2 * (3.5 if backward else 1.0)


def sdpa_bytes(B: int, T: int, H: int, d: int, C: Optional[int] = None, elt: int = 2, backward: bool = False) -> float:
    """q, k, v in, o out; the backward adds do in, dq, dk, dv out and re-reads q, k, v, o."""
    return float((9 if backward else 4) * B * T * H * d * elt)


def fla_flops(B: int, T: int, H: int, d: int, C: int = 64, backward: bool = False) -> float:
    """FLA's chunked gated delta rule (WY form), approximate: K Kᵀ, the triangular solve, w / u, the state and
    the output per chunk of C = 64; backward ~2x the forward."""
    n = math.ceil(T / C)
    per = 2 * C * C * d + C**3 / 3 + 4 * C * C * d + 4 * C * d * d + 2 * C * d * d + 4 * C * C * d
    return B * H * n * per * (3.0 if backward else 1.0)


def fla_bytes(B: int, T: int, H: int, d: int, C: int = 64, elt: int = 2, backward: bool = False) -> float:
    """q, k, v in, o out, and the fp32 (d, d) state once per chunk; doubled for the backward."""
    n = math.ceil(T / C)
    return float((4 * B * T * H * d * elt + B * H * n * d * d * 4) * (2 if backward else 1))


def op_flops_bytes(op: str, shape: dict, mode: str, elt: int) -> tuple[float, float]:
    """(FLOPs, minimum bytes) of one op case, dispatching to the formulas above."""
    s, backward = shape, mode == "fwd+bwd"
    if op == "titans_memory":
        args = (s["B"], s["T"], s["H"], s["d"], s["C"])
        return titans_flops(*args, backward=backward), titans_bytes(*args, elt=elt, backward=backward)
    if op == "cms_level":
        args = (s["B"], s["T"], s["D"], s["F"], s["C"])
        return cms_flops(*args, backward=backward), cms_bytes(*args, elt=elt, backward=backward)
    if op == "titans_memory_step":
        args = (s["B"], s["H"], s["d"], s["C"])
        return titans_step_flops(*args), titans_step_bytes(*args, elt=elt)
    if op == "cms_level_step":
        args = (s["B"], s["D"], s["F"], s["C"])
        return cms_step_flops(*args), cms_step_bytes(*args, elt=elt)
    raise ValueError(f"op {op!r} is not one of {OPS}")


# ------------------------------------------------------------------------------------------- models


def model_config(name: str, size: str, **overrides):
    """HopeConfig of `name` in MODEL_NAMES at preset `size` ("tiny", "small", "340m", ...), all three at the
    Transformer++ parameter budget: Hope = `hope-<size>`, Transformer++ = `transformer-<size>`, and
    Hope-Attention = Hope's CMS levels with the attention mixer, its CMS width solved for the same budget."""
    from hope.presets import SHAPES, get_preset, matched_hope_config

    if name == "hope":
        return get_preset(f"hope-{size}", **overrides)
    if name == "transformer++":
        return get_preset(f"transformer-{size}", **overrides)
    if name == "hope-attention":
        hidden, layers, heads, vocab = SHAPES[size]
        shape = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_heads=heads, **overrides)
        return matched_hope_config(multiple=64 if hidden >= 1024 else 16, mixer="attention", **shape)
    raise ValueError(f"model {name!r} is not one of {MODEL_NAMES}")


def build_model(name: str, size: str, device="cpu", dtype: torch.dtype = torch.float32, seed: int = 0,
                **overrides):
    """HopeForCausalLM(model_config(name, size, **overrides)) on `device` in `dtype`, seeded."""
    from hope import HopeForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):  # initialise on the device: a 340M model built on CPU first takes seconds
        model = HopeForCausalLM(model_config(name, size, **overrides))
    return model.to(dtype)


def set_kernel_backends(model, titans: str, cms: str) -> None:
    """Switch the kernel backend of a built model per op: the Titans mixer reads `config.kernel_backend` at
    every call, each CMS level keeps the `backend` it was built with. This lets one run time the Titans kernel
    with the CMS reference (or the other way round) without rebuilding the model."""
    from hope.layers.cms import CMSLevel

    model.config.kernel_backend = titans
    for module in model.modules():
        if isinstance(module, CMSLevel):
            module.backend = cms


def train_step(model, batch: int, seq_len: int, autocast: Optional[torch.dtype] = None, seed: int = 0
               ) -> Callable[[], float]:
    """A callable that runs one AdamW training step (next-token loss on random ids) and returns the loss.

    autocast: run forward and backward under torch.autocast in this dtype (bf16 on GPU); parameters and
    optimizer states stay in the model's dtype.
    """
    device = next(model.parameters()).device
    model.train()
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=g).to(device)
    ctx = (lambda: torch.autocast(device.type, dtype=autocast)) if autocast else contextlib.nullcontext

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with ctx():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def prefill(model, prompt_len: int, piece: int, seed: int = 0):
    """Run a random prompt of `prompt_len` tokens (batch 1) through `model` in pieces of `piece` tokens (each
    continues the cache, so memory stays bounded at long prompts). Returns the HopeCache."""
    from hope.cache_hope import HopeCache

    device = next(model.parameters()).device
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=g).to(device)
    cache = HopeCache(model.config.num_hidden_layers)
    with torch.inference_mode():
        for start in range(0, prompt_len, piece):
            model(input_ids=ids[:, start : start + piece], cache=cache, use_cache=True, logits_to_keep=1)
    return cache


def cache_bytes(cache) -> int:
    """Bytes held by every tensor of a HopeCache (KV tensors, Titans and CMS states, conv tails)."""
    from hope.cache_hope import _map_tensors

    sizes: list[int] = []
    for layer in cache.layers:
        _map_tensors(layer.__dict__, lambda t: sizes.append(t.numel() * t.element_size()))
    return sum(sizes)


def decode_step(model, cache, batch: int, seed: int = 0) -> Callable[[], Tensor]:
    """A callable that feeds one random token per sequence (batch rows of `cache`) and returns the logits
    (batch, 1, vocab). Each call advances the cache by one token, as decoding does."""
    device = next(model.parameters()).device
    g = torch.Generator(device="cpu").manual_seed(seed)
    token = torch.randint(0, model.config.vocab_size, (batch, 1), generator=g).to(device)

    def step() -> Tensor:
        with torch.inference_mode():
            return model(input_ids=token, cache=cache, use_cache=True).logits

    return step
