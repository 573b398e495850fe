"""M3, the Multi-scale Momentum Muon optimizer (Algorithm 1 of the arXiv version of Nested Learning, SPEC §6).

    from hope.optim import M3, m3_param_groups
    optimizer = M3(m3_param_groups(model, adamw_lr=2e-3), lr=3e-4)   # or M3(params) for a plain list
    hope-train ... --optim m3 --optim_args "lr=3e-4,slow_chunk_size=100"  # --learning_rate: the AdamW part

M3 is a continuum memory applied to the gradients: a fast momentum, updated every step, and a slow momentum,
updated once every f steps (`slow_chunk_size`) with the sum of that chunk's gradients. Both are orthogonalised
by Newton-Schulz (Muon) and the sum is divided by an AdaGrad-style second moment. Per matrix parameter Θ,
gradient g_t, t = 1, 2, ... (Algorithm 1, its symbols):

    at t = kf + 1 (each chunk's start):  M2 <- M2 + β3 Σ_{i in chunk k-1} g_i;   O2 <- NS_T(M2)
    every step:                          M1 <- M1 + β1 g_t
                                         V  <- V  + β2 g_t²
                                         O1 <- NS_T(M1)
                                         Θ  <- Θ - η (O1 + α O2) / sqrt(V + ε)

What the printed algorithm leaves open, and what this implementation assumes (tests/hope/test_optim.py checks
the optimizer against a literal, loop-based transcription of exactly this):

- The slow sum: Algorithm 1 prints Σ_{i=(k-1)f}^{kf} g_i, which would count g_{(k-1)f} in two chunks; we read it
  as the f gradients of the previous chunk, i = (k-1)f+1 .. kf. In the first chunk (k = 0) there is none:
  M2 = 0 and O2 = NS(0) = 0.
- The momenta and V are sums, as printed (M <- M + β g, no decay: momentum as a memory that learns with
  rate β and never forgets, the paper's Eq. 17 with α_{i+1} = 1). NS is scale-invariant, so β1 and β3 only
  set the balance inside each sum; the step size decays as 1/sqrt(t) through V (AdaGrad).
- ε sits inside the square root, sqrt(V + ε), as the algorithm's fraction prints it. It also bounds the
  step: O1 + α O2 does not scale with the gradient but V does, so an entry whose gradients are tiny moves by
  up to η |O1 + α O2| / sqrt(ε). The default ε = 1e-4 (not Adam's 1e-8) and η = 3e-4 come from 100-step
  sweeps on the demo models (README, "The M3 optimizer"): with ε = 1e-8 the demo's Hope took steps of 0.25
  on weights of scale 0.02 from its first update (its CMS targets P_v have gradients near 1e-6) and went NaN
  within 7 steps.
- NS_T is Muon's quintic Newton-Schulz iteration (Jordan et al. 2024, the paper's [Muon] reference) with its
  coefficients (3.4445, -4.7750, 2.0315), T = `ns_steps` = 5, after scaling the matrix to unit Frobenius
  norm; it maps the singular values into about [0.7, 1.2], not exactly 1. It runs in fp32 (Muon uses bf16 on
  GPUs for speed; fp32 keeps updates reproducible). Parameters with more than 2 dims are a batch of matrices
  over their last two dims (per head for the Titans memories' initial states).
- Decoupled weight decay (`weight_decay`, default 0 = Algorithm 1) is an addition: Θ <- Θ (1 - η λ) first.

Non-matrix parameters go to an AdamW fallback inside the same optimizer, as Muon implementations do: a param
group with `use_m3=False` is plain AdamW (torch.optim.AdamW's update exactly, with `adamw_betas`,
`adamw_eps`). A group without `use_m3` sends each parameter by its shape: >= 2 dims to M3, the rest to AdamW.
`m3_param_groups(model)` makes the usual split: hidden matrices to M3; embeddings, the output head, norms,
biases, short-convolution taps and every 1-D or 0-D parameter to AdamW.

State per M3 parameter: M1, V, M2, O2 and the chunk's gradient sum (five buffers of the parameter's size, in
its dtype), plus the step count; `state_dict` / `load_state_dict` round-trip it, so resuming is exact.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

# Muon's quintic Newton-Schulz coefficients: X <- a X + b (X Xᵀ) X + c (X Xᵀ)² X.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(matrix: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """Approximate polar factor U Vᵀ of `matrix` (..., m, n) (batched over leading dims), in fp32 or fp64.

    The Frobenius normalisation puts every singular value in [0, 1]; `steps` quintic iterations then push them
    into about [0.7, 1.2]. NS(0) = 0. Returns a tensor of matrix's shape in fp32 (fp64 if matrix is fp64).
    """
    if matrix.dim() < 2:
        raise ValueError(f"newton_schulz needs a matrix (..., m, n), got shape {tuple(matrix.shape)}")
    x = matrix.to(torch.promote_types(matrix.dtype, torch.float32))
    transposed = x.shape[-2] > x.shape[-1]
    if transposed:  # iterate on the short side: X Xᵀ is then the smaller Gram matrix
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if transposed else x


def _check_betas(name: str, betas: Sequence[float], count: int) -> tuple:
    if len(tuple(betas)) != count or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
        raise ValueError(f"{name}={tuple(betas)!r} is not allowed: give {count} numbers in [0, 1)")
    return tuple(float(b) for b in betas)


class M3(torch.optim.Optimizer):
    """Multi-scale Momentum Muon (Algorithm 1), with an AdamW fallback for non-matrix parameters.

    params: parameters or param groups; a group may set `use_m3` (True: M3, False: AdamW; absent: by shape,
        >= 2 dims to M3) and override any default below.
    lr: η, the step size of both paths (a group's own lr wins: `m3_param_groups` gives AdamW its own).
    betas: (β1, β2, β3): fast momentum, second moment, slow momentum rates.
    alpha: α, the weight of the slow momentum's orthogonalisation O2 in the update.
    eps: ε under the square root of the M3 update.
    slow_chunk_size: f, steps per update of the slow momentum (Algorithm 1's frequency).
    ns_steps: T, Newton-Schulz iterations.
    weight_decay: decoupled decay λ, both paths (0 = Algorithm 1).
    adamw_betas, adamw_eps: the AdamW fallback's betas and eps.
    """

    def __init__(
        self,
        params: Union[Iterable[Tensor], Iterable[dict]],
        lr: float = 3e-4,
        betas: Sequence[float] = (0.9, 0.999, 0.9),
        alpha: float = 1.0,
        eps: float = 1e-4,
        slow_chunk_size: int = 100,
        ns_steps: int = 5,
        weight_decay: float = 0.0,
        adamw_betas: Sequence[float] = (0.9, 0.999),
        adamw_eps: float = 1e-8,
    ):
        defaults = dict(lr=lr, betas=betas, alpha=alpha, eps=eps, slow_chunk_size=slow_chunk_size,
                        ns_steps=ns_steps, weight_decay=weight_decay, adamw_betas=adamw_betas, adamw_eps=adamw_eps,
                        use_m3=None)
        super().__init__(params, defaults)
        for group in self.param_groups:
            self._check_group(group)

    @staticmethod
    def _check_group(group: dict) -> None:
        for name in ("lr", "eps", "adamw_eps"):
            if not (isinstance(group[name], (int, float)) and group[name] > 0):
                raise ValueError(f"M3: {name}={group[name]!r} is not allowed: it must be a number > 0")
        for name in ("alpha", "weight_decay"):
            if not (isinstance(group[name], (int, float)) and group[name] >= 0):
                raise ValueError(f"M3: {name}={group[name]!r} is not allowed: it must be a number >= 0")
        for name in ("slow_chunk_size", "ns_steps"):
            value = group[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"M3: {name}={value!r} is not allowed: it must be a positive int")
        group["betas"] = _check_betas("M3: betas", group["betas"], 3)
        group["adamw_betas"] = _check_betas("M3: adamw_betas", group["adamw_betas"], 2)
        if group["use_m3"] not in (None, True, False):
            raise ValueError(f"M3: use_m3={group['use_m3']!r} is not allowed: True, False or absent (by shape)")
        if group["use_m3"]:
            flat = [tuple(p.shape) for p in group["params"] if p.dim() < 2]
            if flat:
                raise ValueError(f"M3: a use_m3=True group holds parameters of shapes {flat}: M3 orthogonalises "
                                 "matrices; put them in a use_m3=False (AdamW) group")

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._check_group(self.param_groups[-1])

    @staticmethod
    def _uses_m3(group: dict, param: Tensor) -> bool:
        return param.dim() >= 2 if group["use_m3"] is None else group["use_m3"]

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("M3 does not support sparse gradients")
                if self._uses_m3(group, param):
                    self._m3_step(param, group)
                else:
                    self._adamw_step(param, group)
        return loss

    def _m3_step(self, param: Tensor, group: dict) -> None:
        """One step of Algorithm 1 for one matrix (or batch of matrices) parameter."""
        grad, state = param.grad, self.state[param]
        if not state:
            state["step"] = 0
            for name in ("fast_momentum", "second_moment", "slow_momentum", "slow_orthogonal", "chunk_grad_sum"):
                state[name] = torch.zeros_like(param, memory_format=torch.preserve_format)
        beta1, beta2, beta3 = group["betas"]
        lr, f, steps = group["lr"], group["slow_chunk_size"], group["ns_steps"]
        state["step"] += 1
        if state["step"] > 1 and (state["step"] - 1) % f == 0:  # t = kf + 1, k >= 1: the slow memory's step
            state["slow_momentum"].add_(state["chunk_grad_sum"], alpha=beta3)
            state["chunk_grad_sum"].zero_()
            state["slow_orthogonal"].copy_(newton_schulz(state["slow_momentum"], steps))
        state["chunk_grad_sum"].add_(grad)
        state["fast_momentum"].add_(grad, alpha=beta1)
        state["second_moment"].addcmul_(grad, grad, value=beta2)
        update = newton_schulz(state["fast_momentum"], steps)
        if group["alpha"]:
            update = update + group["alpha"] * state["slow_orthogonal"].to(update.dtype)
        update = update / (state["second_moment"].to(update.dtype) + group["eps"]).sqrt()
        if group["weight_decay"]:
            param.mul_(1 - lr * group["weight_decay"])
        param.add_(update.to(param.dtype), alpha=-lr)

    def _adamw_step(self, param: Tensor, group: dict) -> None:
        """torch.optim.AdamW's update (decoupled weight decay, bias-corrected moments)."""
        grad, state = param.grad, self.state[param]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        beta1, beta2 = group["adamw_betas"]
        lr = group["lr"]
        state["step"] += 1
        step = state["step"]
        if group["weight_decay"]:
            param.mul_(1 - lr * group["weight_decay"])
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (state["exp_avg_sq"].sqrt() / (1 - beta2**step) ** 0.5).add_(group["adamw_eps"])
        param.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1**step))


def m3_param_groups(model: nn.Module, *, adamw_lr: float, lr: Optional[float] = None,
                    weight_decay: float = 0.0) -> list[dict]:
    """M3 for the hidden matrices, AdamW for the rest, as Muon implementations split a network.

    AdamW (`use_m3=False`, lr `adamw_lr`): input embeddings, the output head (tied or not), the short
    convolutions' taps (K scalars per channel, no matrix), and every 1-D / 0-D parameter (norm gains, biases,
    eta / alpha biases, level weights); decay `weight_decay` on the 2-D ones, none on the 1-D/0-D.
    M3 (`use_m3=True`, lr `lr`, or M3's own lr when None, decay `weight_decay`): every other parameter of
    >= 2 dims.
    Frozen parameters (requires_grad=False) are left out. Empty groups are dropped.
    """
    from .layers.common import ShortConv

    adamw_ids = set()
    for module in model.modules():
        if isinstance(module, (nn.Embedding, ShortConv)):
            adamw_ids.update(id(p) for p in module.parameters(recurse=False))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        adamw_ids.update(id(p) for p in head.parameters())
    m3, adamw_decay, adamw_flat = [], [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        if param.dim() < 2:
            adamw_flat.append(param)
        elif id(param) in adamw_ids:
            adamw_decay.append(param)
        else:
            m3.append(param)
    groups = [
        dict(params=m3, use_m3=True, weight_decay=weight_decay, **({} if lr is None else {"lr": lr})),
        dict(params=adamw_decay, use_m3=False, lr=adamw_lr, weight_decay=weight_decay),
        dict(params=adamw_flat, use_m3=False, lr=adamw_lr, weight_decay=0.0),
    ]
    return [group for group in groups if group["params"]]
