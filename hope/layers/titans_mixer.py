"""The self-modifying Titans mixer (SPEC §2 v2, paper Eqs. 79-93) around the `hope_kernels.titans` op (linear main
memory, `memory_depth=1`) or the `hope_kernels.deep_titans` op (deep main memory M(z) = z + W1 silu(W2 z), Eq. 91,
`memory_depth=2`)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from transformers import initialization as init

from hope.cache_hope import HopeLayerCache
from hope_kernels.deep_titans import adaptive_rows, titans_deep_memory, titans_deep_memory_step
from hope_kernels.titans import memory_rows, titans_memory, titans_memory_step

from .common import RMSNorm, ShortConv


class TitansMixer(nn.Module):
    """x (B, T, D) -> (RMSNorm(o) * silu(x W_g)) W_o, with o read from the per-sequence fast memories."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        D, H = config.hidden_size, config.num_heads
        self.num_heads, self.head_dim = H, D // H
        self.q_proj = nn.Linear(D, D, bias=False)
        self.a_proj = nn.Linear(D, D, bias=False)
        self.g_proj = nn.Linear(D, D, bias=False)
        self.o_proj = nn.Linear(D, D, bias=False)
        self.q_conv = ShortConv(D, config.conv_size)
        self.a_conv = ShortConv(D, config.conv_size)
        d = self.head_dim
        self.deep = config.memory_depth == 2
        if self.deep:
            # Deep main memory M(z) = z + W1 silu(W2 z) per head (Eq. 91); the generating memories
            # [W_k ; W_v ; w_eta ; w_alpha] stay residual-linear. All initial values are meta-learned (SPEC §2).
            h = config.memory_hidden
            self.memory_w1 = nn.Parameter(torch.empty(H, d, h))
            self.memory_w2 = nn.Parameter(torch.empty(H, h, d))
            self.adaptive_init = nn.Parameter(torch.empty(H, adaptive_rows(d), d))
        else:
            # Initial fast memories Z_0 = [W ; W_k ; W_v ; w_eta ; w_alpha] per head, meta-learned (SPEC §2).
            self.memory_init = nn.Parameter(torch.empty(H, memory_rows(d), d))
        self.b_eta = nn.Parameter(torch.empty(H))
        self.b_alpha = nn.Parameter(torch.empty(H))
        # Without momentum there is no beta: no parameter or buffer (DDP sees none unused, and the module holds
        # only state that a checkpoint saves and from_pretrained accounts for).
        self.momentum_logit = nn.Parameter(torch.empty(H)) if config.momentum else None
        self.o_norm = RMSNorm(d, config.rms_norm_eps)

    @torch.no_grad()
    def reset_memory_parameters(self) -> None:
        # transformers.initialization skips a tensor that from_pretrained loaded (`_is_hf_initialized`); the sliced
        # memories are drawn into a fresh tensor and copied in by one such guarded call.
        d = self.head_dim
        # Residual memories X(z) = z + X z start near the identity (SPEC §2 v2): entries of std 0.1/sqrt(d) give
        # a spectral norm of about 0.2. Never zero: the heads' first keys, values and writes must differ.
        # Bare memories (memory_residual=False) need unit-scale maps instead: q and a are unit-scale.
        residual = self.config.memory_residual
        square_std = 0.1 * d**-0.5 if residual else d**-0.5
        if self.deep:
            # W2 (input side): ~N(0, 1/d) entries give ||W2 z|| about 1 for unit z (h = d), SiLU's curved range.
            init.normal_(self.memory_w2, 0.0, d**-0.5)
            # W1 (output side): small, so M(z) = z + W1 silu(W2 z) starts near the identity; non-zero, so that
            # W2's inner gradient (through W1ᵀ e) exists from the first chunk.
            init.normal_(self.memory_w1, 0.0, self.config.initializer_range)
            memory = self.adaptive_init
            fresh = z = torch.empty_like(memory)
        else:
            memory = self.memory_init
            fresh = torch.empty_like(memory)
            fresh[:, :d].normal_(0.0, square_std)  # W
            z = fresh[:, d:]
        z[:, :d].normal_(0.0, square_std)  # W_k: k is normalised anyway
        z[:, d : 2 * d].normal_(0.0, square_std if residual else 1.0 / d)  # W_v
        z[:, 2 * d :].normal_(0.0, self.config.initializer_range)  # w_eta, w_alpha start near their biases
        init.copy_(memory, fresh)
        init.zeros_(self.b_eta)  # eta starts at eta_max / 2
        init.constant_(self.b_alpha, math.log(0.99 / 0.01))  # alpha about 0.99 (SPEC §2)
        if self.momentum_logit is not None:
            init.zeros_(self.momentum_logit)  # beta = 0.5
        init.normal_(self.q_conv.weight, 0.0, self.config.conv_size**-0.5)
        init.normal_(self.a_conv.weight, 0.0, self.config.conv_size**-0.5)

    def forward(self, x: Tensor, valid: Optional[Tensor], cache: Optional[HopeLayerCache]) -> Tensor:
        """x: (B, T, D) normed input; valid: (B, T) bool or None; cache: updated in place when given."""
        B, T, D = x.shape
        H, d = self.num_heads, self.head_dim
        q, q_tail = self.q_conv(self.q_proj(x), None if cache is None else cache.conv.get("q"), valid)
        a, a_tail = self.a_conv(self.a_proj(x), None if cache is None else cache.conv.get("a"), valid)
        a = F.silu(a).view(B, T, H, d)
        # CUDA autocast runs normalize in fp32; the memory ops take q and a in one dtype.
        q = F.normalize(F.silu(q).view(B, T, H, d), dim=-1).to(a.dtype)
        config = self.config
        kwargs = dict(
            chunk_size=config.chunk_size, adaptive_chunk_size=config.adaptive_chunk_size, eta_max=config.eta_max,
            momentum=config.momentum, dgd=config.dgd, objective=config.objective, memory_target=config.memory_target,
            memory_residual=config.memory_residual, memory_value_norm=config.memory_value_norm,
            memory_retention=config.memory_retention, adaptive=tuple(config.adaptive), backend=config.kernel_backend,
        )
        if self.deep:
            memory, memory_step = titans_deep_memory, titans_deep_memory_step
            params = (self.memory_w1, self.memory_w2, self.adaptive_init, self.b_eta, self.b_alpha, self.momentum_logit)
        else:
            memory, memory_step = titans_memory, titans_memory_step
            params = (self.memory_init, self.b_eta, self.b_alpha, self.momentum_logit)
        if cache is None:
            o, _ = memory(q, a, *params, mask=valid, **kwargs)
        else:
            cache.conv["q"], cache.conv["a"] = q_tail, a_tail
            if T == 1 and cache.memory is not None:
                o, cache.memory = memory_step(
                    q[:, 0], a[:, 0], *params, mask=None if valid is None else valid[:, 0], state=cache.memory, **kwargs
                )
                o = o.unsqueeze(1)
            else:
                o, cache.memory = memory(
                    q, a, *params, mask=valid, state=cache.memory, output_final_state=True, **kwargs
                )
        o = self.o_norm(o.to(x.dtype)).reshape(B, T, D)
        return self.o_proj(o * F.silu(self.g_proj(x)))
