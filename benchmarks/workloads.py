"""What the benchmarks run, shared by the pytest-benchmark suites (`make bench`) and `gpu_suite.py`.

* Op cases: `op_case(op, backend, shape, mode, dtype, device)` returns a zero-argument callable that runs one
  op once (forward, forward + backward, or one decode token) through one backend:
    eager    the PyTorch reference (`hope_kernels.<family>.reference`)
    compile  the same reference under torch.compile: for the chunked ops only the per-chunk piece is compiled
             (`_segment` / `_chunk_piece` / `_deep_segment`; compiling the whole function would unroll the
             Python chunk loop, minutes of compile at long T), for the decode steps the whole step function
    triton   the Triton kernels (`chunk.py`, `step.py`); compiled on CUDA, Triton's interpreter on CPU
* FLOP and byte counts of every op and peer (`*_flops`, `*_bytes`): matmul FLOPs of each algorithm (elementwise
  work not counted) and the fewest bytes it must move through device memory.
* Models: `model_config(name, size)` for Hope, Hope-Attention and Transformer++ at one parameter budget
  (`hope/presets.py`), training-step and decode-step callables.

Ops: the linear Titans memory (`titans_memory`), the deep Titans memory of `memory_depth=2`
(`titans_deep_memory`, M(z) = z + W1 silu(W2 z) with hidden width h), one CMS level (`cms_level`), and the
decode step of each (`*_step`). Shapes use the ops' own layouts: Titans (B, T, H, d) with chunk size C, the deep
op adds h; CMS (B, T, D) with hidden F and chunk C; decode steps drop T.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import math
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

OPS = ("titans_memory", "cms_level", "titans_memory_step", "cms_level_step", "titans_deep_memory",
       "titans_deep_memory_step")
OP_BACKENDS = ("eager", "compile", "triton")
STEP_OPS = ("titans_memory_step", "cms_level_step", "titans_deep_memory_step")
MODEL_NAMES = ("hope", "hope-attention", "transformer++")


@dataclasses.dataclass(frozen=True)
class OpFamily:
    """Where one chunked op and its decode step live: the reference module with the chunked function, the
    step function and the per-chunk piece that the compile backend compiles, and the Triton entry points
    ("module:function")."""

    reference: str
    chunked: str
    step: str
    piece: str
    triton_chunked: Optional[str]  # None: the op has no kernel
    triton_step: Optional[str]


FAMILIES = {
    "titans_memory": OpFamily("hope_kernels.titans.reference", "titans_memory_reference",
                              "titans_memory_step_reference", "_segment",
                              "hope_kernels.titans.chunk:titans_memory_triton",
                              "hope_kernels.titans.step:titans_memory_step_triton"),
    "cms_level": OpFamily("hope_kernels.cms.reference", "cms_level_reference", "cms_level_step_reference",
                          "_chunk_piece", "hope_kernels.cms.chunk:cms_level_triton",
                          "hope_kernels.cms.step:cms_level_step_triton"),
    "titans_deep_memory": OpFamily("hope_kernels.deep_titans.reference", "titans_deep_memory_reference",
                                   "titans_deep_memory_step_reference", "_deep_segment",
                                   "hope_kernels.deep_titans.chunk:titans_deep_memory_triton",
                                   "hope_kernels.deep_titans.step:titans_deep_memory_step_triton"),
}


def chunked_op(op: str) -> str:
    """The chunked op of `op`: itself, or the op whose decode step it is ("titans_memory_step" -> "titans_memory")."""
    if op not in OPS:
        raise ValueError(f"op {op!r} is not one of {OPS}")
    return op[: -len("_step")] if op in STEP_OPS else op


def _import(path: str) -> Callable:
    """'module:function' -> the function (the kernel modules import triton: only when a backend needs them)."""
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


# ------------------------------------------------------------------------------------------- backends


def backend_unavailable_reason(backend: str, device: torch.device, allow_interpreter: bool = False,
                               op: Optional[str] = None) -> Optional[str]:
    """Why `backend` cannot run `op` (any op when None) on `device` here, or None when it can.

    Triton kernels need CUDA; on CPU they run only in Triton's interpreter (TRITON_INTERPRET=1), which is a
    correctness tool, far too slow to time: `allow_interpreter` callers (the GPU suite's dry run, which only
    exercises code paths) accept it, benchmarks do not.
    """
    from hope_kernels._dispatch import triton_available, triton_interpreting

    if backend not in OP_BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {OP_BACKENDS}")
    if backend == "triton":
        if op is not None:
            package = importlib.import_module(FAMILIES[chunked_op(op)].reference.rsplit(".", 1)[0])
            if not package.HAS_TRITON:
                return f"{package.__name__} has no Triton kernel yet"
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
    fam = FAMILIES[chunked_op(op)]
    step = op in STEP_OPS
    ref = importlib.import_module(fam.reference)
    eager = getattr(ref, fam.step if step else fam.chunked)
    if backend == "eager":
        return eager
    if backend == "compile":
        if step:
            return compiled(eager, compile_backend)

        def run_compiled(*args, **kwargs):
            with _patched(ref, fam.piece, compile_backend):
                return eager(*args, **kwargs)

        return run_compiled
    if backend == "triton":
        return _import(fam.triton_step if step else fam.triton_chunked)
    raise ValueError(f"backend {backend!r} is not one of {OP_BACKENDS}")


# ------------------------------------------------------------------------------------------- inputs


def titans_kwargs(C: int) -> dict:
    """The model's default Titans settings (SPEC §2 v2): no momentum, DGD, l2 objective, self targets, residual
    memories, unit values, retention toward the initial state, every row adaptive."""
    from hope.configuration_hope import ETA_MAX

    return dict(chunk_size=C, eta_max=ETA_MAX, momentum=False, dgd=True, objective="l2", memory_target="self",
                memory_residual=True, memory_value_norm=True, memory_retention="init",
                adaptive=("k", "v", "eta", "alpha"))


def cms_kwargs(C: int) -> dict:
    """The model's default CMS settings (SPEC §3 v2): the Gauss-Newton step at eta_max 1, decay 0.05, l2."""
    from hope.configuration_hope import CMS_DECAY

    return dict(chunk_size=C, eta_max=1.0, objective="l2", decay=CMS_DECAY, step="gauss_newton")


def titans_inputs(B: int, T: int, H: int, d: int, dtype: torch.dtype, device, requires_grad: bool = False,
                  seed: int = 0) -> list[Tensor]:
    """[q (B, T, H, d) unit rows, a (B, T, H, d), z0 (H, 3d+2, d), b_eta, b_alpha (H,)]; q and a in `dtype`, the
    parameters fp32 (as in the model); no momentum_logit (`titans_kwargs` has no momentum). Random data: zeros
    would hide unwritten outputs."""
    from hope_kernels.titans.reference import memory_rows

    g = torch.Generator(device="cpu").manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, d, generator=g), dim=-1)
    a = torch.randn(B, T, H, d, generator=g)
    z0 = 0.1 * torch.randn(H, memory_rows(d), d, generator=g) / math.sqrt(d)  # residual memories start small
    b_eta = -1.0 + 0.3 * torch.randn(H, generator=g)
    b_alpha = 4.0 + 0.3 * torch.randn(H, generator=g)
    out = [q.to(dtype), a.to(dtype), z0, b_eta, b_alpha]
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


def deep_titans_inputs(B: int, T: int, H: int, d: int, h: int, dtype: torch.dtype, device,
                       requires_grad: bool = False, seed: int = 0) -> list[Tensor]:
    """[q (B, T, H, d) unit rows, a (B, T, H, d), w1_0 (H, d, h), w2_0 (H, h, d), z0 (H, 2d+2, d), b_eta, b_alpha]
    for the deep op: `titans_inputs` with the linear W rows dropped from z0 (the deep op's generating memories are
    [W_k ; W_v ; w_eta ; w_alpha]) and the two main-memory layers at the model's scales
    (hope/layers/titans_mixer.py: W2 ~ N(0, 1/d), so silu(W2 q) is in SiLU's curved range; W1 small, so M starts
    near the identity). q and a in `dtype`, the parameters fp32."""
    q, a, z0, b_eta, b_alpha = titans_inputs(B, T, H, d, dtype, device, seed=seed)
    g = torch.Generator(device="cpu").manual_seed(seed + 1)  # other draws than titans_inputs' own generator
    w1 = 0.02 * torch.randn(H, d, h, generator=g)
    w2 = torch.randn(H, h, d, generator=g) / math.sqrt(d)
    out = [q, a, w1.to(device), w2.to(device), z0[:, d:].contiguous(), b_eta, b_alpha]
    return [t.requires_grad_(requires_grad) for t in out]


def _chunked_case(op: str, shape: dict, T: int, dtype: torch.dtype, device, requires_grad: bool = False
                  ) -> tuple[list[Tensor], int, dict]:
    """Inputs of chunked op `op` over T tokens at `shape` (whose own T, if any, is ignored), how many of them
    have a token dimension (they come first), and the op's keyword arguments."""
    s, C = shape, shape["C"]
    if op == "titans_memory":
        return titans_inputs(s["B"], T, s["H"], s["d"], dtype, device, requires_grad), 2, titans_kwargs(C)
    if op == "titans_deep_memory":
        xs = deep_titans_inputs(s["B"], T, s["H"], s["d"], s["h"], dtype, device, requires_grad)
        return xs, 2, titans_kwargs(C)  # the deep op takes the linear op's settings
    if op == "cms_level":
        return cms_inputs(s["B"], T, s["D"], s["F"], dtype, device, requires_grad), 1, cms_kwargs(C)
    raise ValueError(f"op {op!r} is not one of the chunked ops {tuple(FAMILIES)}")


def _decode_state(op: str, shape: dict, dtype: torch.dtype, device) -> tuple[list[Tensor], object, dict]:
    """Inputs of one decode token of step op `op` and the state after a prompt of C + 3 tokens (mid-chunk, as in
    decoding), made by the chunked reference. Returns (args of the step op, state, keyword arguments)."""
    base = chunked_op(op)
    prompt = shape["C"] + 3
    reference = _import(f"{FAMILIES[base].reference}:{FAMILIES[base].chunked}")
    with torch.no_grad():
        xs, n_tok, kwargs = _chunked_case(base, shape, prompt + 1, dtype, device)
        _, state = reference(*(x[:, :prompt] for x in xs[:n_tok]), *xs[n_tok:], **kwargs, output_final_state=True)
    return [x[:, prompt] for x in xs[:n_tok]] + xs[n_tok:], state, kwargs


def op_case(op: str, backend: str, shape: dict, mode: str, dtype: torch.dtype, device,
            compile_backend: str = "inductor") -> Callable[[], Tensor]:
    """A callable that runs `op` once through `backend` on fixed random inputs and returns its output.

    shape: Titans {B, T, H, d, C}, deep Titans {B, T, H, d, h, C}, CMS {B, T, D, F, C}; the decode steps take the
    same keys without T.
    mode: "fwd", "fwd+bwd" (backward of sum(output * 1), gradients into every input) or, for the step ops,
    "step" (one decode token from a mid-chunk state, no autograd).
    """
    fn = op_function(op, backend, compile_backend)
    if op in STEP_OPS:
        if mode != "step":
            raise ValueError(f"{op} has only mode 'step', got {mode!r}")
        args, state, kwargs = _decode_state(op, shape, dtype, device)

        def step() -> Tensor:
            with torch.no_grad():
                return fn(*args, state=state, **kwargs)[0]

        return step
    if mode not in ("fwd", "fwd+bwd"):
        raise ValueError(f"{op} has modes 'fwd' and 'fwd+bwd', got {mode!r}")
    backward = mode == "fwd+bwd"
    xs, _, kwargs = _chunked_case(op, shape, shape["T"], dtype, device, requires_grad=backward)

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


# The linear Titans memory as the v2 kernels compute it (hope_kernels/titans/chunk.py), per segment of C tokens and
# per (b, h), head dim d, G = 2d+2 generating rows; matmul FLOPs of every tl.dot, 2 per multiply-add:
#   K1 (generating scan): k, v = a (E + W_k,c)ᵀ, a (E + W_v,c)ᵀ 4 C d^2; K Kᵀ 2 C^2 d; T = (I + A)^-1, merges of the
#     16-blocks (C/16 dots of C^3) C^4/8; T Kd 2 C^2 d; per generating row: the write, T Wr, (T Kd) X_0ᵀ and the
#     state update 6 C d + 2 C^2
#   K1b: w' = T (Kd - P), u' = T V0 4 C^2 d;  K2: v_new = u' - w' W_0ᵀ, W's update 4 C d^2;
#   K3: Q Kᵀ, Q W_0ᵀ, (Gamma ⊙ Q Kᵀ) v_new 4 C^2 d + 2 C d^2
#   forward: 10 C d^2 + 12 C^2 d + C^4/8 + G (6 C d + 2 C^2).
# The backward (B1 dv from the reads, B2 W's state, B3 the parallel chunk part incl. the T-chain of w', u', B4 the
# generating scan, which re-forms N per generating row and reads k, v and the norms of k_raw, v_raw back from K1,
# B5 da):
#   20 C d^2 + 34 C^2 d + 4 C^3 + G (16 C d + 6 C^2).
# Retention toward the initial memories (memory_retention="init", the default) adds the anchor's terms: forward
# T Ka (K1) 2 C^2 d, (T Ka) X_Aᵀ per generating row 2 C d, Ka W_Aᵀ (K1b) and Q W_Aᵀ (K3) 4 C d^2; backward B3's
# dO W_A and dW_A 4 C d^2, B3''s dY W_A and dYᵀ Ka 4 C d^2, B4's T Ka 2 C^2 d and per generating row 6 C d:
#   forward + 4 C d^2 + 2 C^2 d + 2 G C d,   backward + 8 C d^2 + 2 C^2 d + 6 G C d.


def titans_flops(B: int, T: int, H: int, d: int, C: int, backward: bool = False, anchored: bool = True) -> float:
    """The v2 kernels' matmul FLOPs (the count above), per segment of C tokens; `anchored`: retention toward the
    initial memories (the model's default)."""
    nseg = math.ceil(T / C)
    G = 2 * d + 2
    per = 10 * C * d * d + 12 * C * C * d + C**4 / 8 + G * (6 * C * d + 2 * C * C)
    if anchored:
        per += 4 * C * d * d + 2 * C * C * d + 2 * G * C * d
    if backward:
        per += 20 * C * d * d + 34 * C * C * d + 4 * C**3 + G * (16 * C * d + 6 * C * C)
        if anchored:
            per += 8 * C * d * d + 2 * C * C * d + 6 * G * C * d
    return float(B * H * nseg * per)


def _memory_bytes(B: int, T: int, H: int, d: int, C: int, state: int, elt: int, backward: bool) -> float:
    """Bytes of a chunked Titans-style memory with `state` fp32 elements per (b, h) (linear: (3d+2) d; deep:
    (2d+2) d + 2 d h): q, a in and o out, plus one fp32 checkpoint of the state per segment (written once; the
    segment's writes read its chunk start back). The backward adds q, a, do in, dq, da out, the checkpoints read
    back and the state gradient carried once per segment."""
    nseg = math.ceil(T / C)
    act = 3 * B * T * H * d * elt
    stream = B * H * nseg * 2 * state * 4
    if backward:
        act += 5 * B * T * H * d * elt
        stream += B * H * nseg * 3 * state * 4
    return float(act + stream)


def titans_bytes(B: int, T: int, H: int, d: int, C: int, elt: int = 2, backward: bool = False) -> float:
    """q, a in and o out, plus the fp32 (3d+2, d) checkpoint stream per segment (`_memory_bytes`)."""
    return _memory_bytes(B, T, H, d, C, (3 * d + 2) * d, elt, backward)


def titans_step_flops(B: int, H: int, d: int, C: int) -> float:
    """One token per (b, h): Z_c a (k, v, eta, alpha), the write (E + X_c) u kᵀ and the DGD term (X_{t-1} k) kᵀ over
    all R = 3d+2 rows (a mat-vec and an outer product each), and the read W q."""
    R = 3 * d + 2
    return float(B * H * (10 * R * d + 2 * d * d))


def _memory_step_bytes(B: int, H: int, d: int, state: int, elt: int) -> float:
    """One decode token of a Titans-style memory with `state` fp32 elements per (b, h) in each state tensor: read
    the chunk-start and current states, write both (the chunk start moves at a chunk's end); q, a in, o out."""
    return float(B * H * (4 * state * 4 + 3 * d * elt))


def titans_step_bytes(B: int, H: int, d: int, C: int, elt: int = 2) -> float:
    """Read Z_c, Z_t and write Z_t, Z_c (fp32, (R, d) each per (b, h)); q, a in, o out."""
    return _memory_step_bytes(B, H, d, (3 * d + 2) * d, elt)


# The deep Titans memory (memory_depth=2, hope_kernels/deep_titans/chunk.py), per segment of C tokens and (b, h),
# head dim d, hidden width h: the generating scan as the linear op's (K1: 4 C d^2 + 4 C^2 d + C^4/8 + G (6 C d +
# 2 C^2); its backward B4 + B5: 8 C d^2 + 8 C^2 d + 2 C^3 + G (16 C d + 6 C^2)), then the serial W1 / W2 pass:
#   forward, over the hidden blocks twice: p, the self target and e's read as one product (3 of C x d x h), then
#     p again, e W1_c, K W2_0ᵀ, Q W2_0ᵀ, hid W1_0ᵀ and the two state updates (7), Q Kᵀ and (Gamma ⊙ hid sᵀ) E1 (2
#     of C^2 d), T Y2, (Gamma ⊙ Q Kᵀ) N2, hid sᵀ (3 of C^2 h)               20 C d h + 4 C^2 d + 6 C^2 h
#   backward, seven passes over the hidden blocks (`_deep_bwd_kernel`): 29 C x d x h (3 + 9 + 2 + 2 + 4 + 5 + 4,
#     the forward's recomputed among them; p = K W2_cᵀ once after pass 1, kept for the later passes), 8 C^2 d (Q Kᵀ
#     twice, G1, dE1's, G2 K, G2ᵀ Q, the chain's K Kᵀ and dKK K), 10 C^2 h and Tᵀ M
#                                                                        58 C d h + 16 C^2 d + 20 C^2 h + 2 C^3
# Retention toward the initial memories (the default) adds, besides the generating scan's anchor terms (as the
# linear op's: K1 2 C^2 d + 2 G C d, B4 2 C^2 d + 6 G C d), K W2_Aᵀ, Q W2_Aᵀ and hid W1_Aᵀ forward (6 C d h)
# and eight C x d x h products backward (16 C d h).
# The curvature guard is elementwise work only.


def deep_titans_flops(B: int, T: int, H: int, d: int, h: int, C: int, backward: bool = False,
                      anchored: bool = True) -> float:
    """The v2 deep kernels' matmul FLOPs (the count above), per segment of C tokens; `anchored` as `titans_flops`."""
    nseg = math.ceil(T / C)
    G = 2 * d + 2
    per = 4 * C * d * d + 4 * C * C * d + C**4 / 8 + G * (6 * C * d + 2 * C * C)
    per += 20 * C * d * h + 4 * C * C * d + 6 * C * C * h
    if anchored:
        per += 2 * C * C * d + 2 * G * C * d + 6 * C * d * h
    if backward:
        per += 8 * C * d * d + 8 * C * C * d + 2 * C**3 + G * (16 * C * d + 6 * C * C)
        per += 58 * C * d * h + 16 * C * C * d + 20 * C * C * h + 2 * C**3
        if anchored:
            per += 2 * C * C * d + 6 * G * C * d + 16 * C * d * h
    return float(B * H * nseg * per)


def deep_titans_bytes(B: int, T: int, H: int, d: int, h: int, C: int, elt: int = 2, backward: bool = False) -> float:
    """As `titans_bytes` with the deep state per (b, h): the (2d+2, d) adaptive rows plus W1 (d, h) and W2 (h, d)."""
    return _memory_bytes(B, T, H, d, C, (2 * d + 2) * d + 2 * d * h, elt, backward)


def deep_titans_step_flops(B: int, H: int, d: int, h: int, C: int) -> float:
    """One token per (b, h): the generating rows as `titans_step_flops` over their R = 2d+2 rows (10 R d); the main
    memory's p = W2_c k, the self target (2 mat-vecs), e, g = W1_cᵀ e, the outer products e silu(p)ᵀ, g kᵀ and
    the DGD term (W2 k) kᵀ, and the read W1 silu(W2 q) (10 x 2 d h)."""
    return float(B * H * (10 * (2 * d + 2) * d + 20 * d * h))


def deep_titans_step_bytes(B: int, H: int, d: int, h: int, C: int, elt: int = 2) -> float:
    """As `titans_step_bytes` with the deep state: (2d+2) d + 2 d h fp32 elements per state tensor and (b, h)."""
    return _memory_step_bytes(B, H, d, (2 * d + 2) * d + 2 * d * h, elt)


def cms_learning(T: int, C: int) -> tuple[int, int]:
    """(tokens whose inner step runs, chunk updates) of one call of T tokens from position 0 without a final
    state, as the suite times it (`cms_kwargs`): nobody reads the last segment's update, so it is skipped (the
    kernels' and the reference's `learn_last`), and its tokens are only read."""
    updates = (T - 1) // C
    return updates * C, updates


def cms_flops(B: int, T: int, D: int, F: int, C: int, backward: bool = False) -> float:
    """One level: every token's read 6DF and target 2D^2, and the inner gradients 8DF of the tokens that learn
    (`cms_learning`). The backward adds, per token, the read's 12DF and the target's 4D^2, and for a token that
    learns 26DF more (the inner gradients' backward and the kernel's recompute of the update's operands)."""
    learning, _ = cms_learning(T, C)
    flops = T * (6 * D * F + 2 * D * D) + learning * 8 * D * F
    if backward:
        flops += T * (12 * D * F + 4 * D * D) + learning * 26 * D * F
    return float(B * flops)


def cms_bytes(B: int, T: int, D: int, F: int, C: int, elt: int = 2, backward: bool = False) -> float:
    """z in, y out, the parameters (3FD + D^2) in; the fp32 θ of each chunk update out (and back in for the next
    chunk's read) per sequence: the cost model's 2 x 3FD fp32 per update, the floor of any implementation. The
    backward adds dy in, dz out, the parameter gradients and a re-read of θ."""
    _, n_updates = cms_learning(T, C)
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
    if op == "titans_deep_memory":
        args = (s["B"], s["T"], s["H"], s["d"], s["h"], s["C"])
        return deep_titans_flops(*args, backward=backward), deep_titans_bytes(*args, elt=elt, backward=backward)
    if op == "titans_deep_memory_step":
        args = (s["B"], s["H"], s["d"], s["h"], s["C"])
        return deep_titans_step_flops(*args), deep_titans_step_bytes(*args, elt=elt)
    raise ValueError(f"op {op!r} is not one of {OPS}")


# ------------------------------------------------------------------------------------------- models


def model_config(name: str, size: str, **overrides):
    """HopeConfig of `name` in MODEL_NAMES at preset `size` ("tiny", "small", "340m", ...), all three at the
    Transformer++ parameter budget: Hope = `hope-<size>`, Transformer++ = `transformer-<size>`, and
    Hope-Attention = Hope's CMS levels with the attention mixer, its CMS width solved for the same budget."""
    from hope.presets import HOPE_CMS_CHUNK_SIZES, SHAPES, get_preset, matched_hope_config

    if name == "hope":
        return get_preset(f"hope-{size}", **overrides)
    if name == "transformer++":
        return get_preset(f"transformer-{size}", **overrides)
    if name == "hope-attention":
        hidden, layers, heads, vocab = SHAPES[size]
        shape = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_heads=heads,
                     cms_chunk_sizes=list(HOPE_CMS_CHUNK_SIZES[size]), **overrides)
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
