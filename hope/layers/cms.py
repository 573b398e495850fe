"""Continuum Memory System (SPEC §3, paper Eqs. 30-31, 70-74): SwiGLU levels that learn in context,
each every `cms_chunk_sizes[l]` tokens, around the `hope_kernels.cms` op."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from transformers.utils import logging

from hope.cache_hope import HopeLayerCache
from hope_kernels.cms import cms_level, cms_level_step

from .common import RMSNorm

logger = logging.get_logger(__name__)


class CMSLevel(nn.Module):
    """One level: MLP_θ(z) = W_down (silu(W_gate z) * (W_up z)), θ_0 = these parameters.

    With `chunk_size=None` it never learns in context: a plain SwiGLU FFN without eta or target parameters.
    With `in_context=False` (config `cms_in_context`) a level with a chunk size takes no in-context step: it
    reads θ_0 on every token, and keeps its eta and target parameters for when the steps are switched back on.
    """

    def __init__(self, hidden_size: int, ffn_size: int, chunk_size: Optional[int], eta_max: float, decay: float,
                 objective: str, step: str, backend: str, in_context: bool):
        super().__init__()
        self.chunk_size, self.eta_max, self.decay, self.objective, self.backend = chunk_size, eta_max, decay, objective, backend
        self.step, self.in_context = step, in_context
        self.w_gate = nn.Parameter(torch.empty(ffn_size, hidden_size))
        self.w_up = nn.Parameter(torch.empty(ffn_size, hidden_size))
        self.w_down = nn.Parameter(torch.empty(hidden_size, ffn_size))
        if chunk_size is not None:
            self.p_v = nn.Parameter(torch.empty(hidden_size, hidden_size))  # target projection P_v
            self.w_eta = nn.Parameter(torch.empty(hidden_size))
            # (1,), not (): FSDP2's fully_shard shards no 0-dim parameter.
            self.b_eta = nn.Parameter(torch.empty(1))

    @property
    def learns_in_context(self) -> bool:
        return self.chunk_size is not None

    def forward(self, z: Tensor, valid: Optional[Tensor], cache: Optional[HopeLayerCache], level: int) -> Tensor:
        """z: (B, T, D) normed level input -> (B, T, D)."""
        if not (self.learns_in_context and self.in_context):
            return F.linear(F.silu(F.linear(z, self.w_gate)) * F.linear(z, self.w_up), self.w_down)
        params = (self.w_gate, self.w_up, self.w_down, self.p_v, self.w_eta, self.b_eta)
        kwargs = dict(chunk_size=self.chunk_size, eta_max=self.eta_max, objective=self.objective, decay=self.decay,
                      step=self.step, backend=self.backend)
        if cache is None:
            y, _ = cms_level(z, *params, mask=valid, **kwargs)
            if z.shape[1] <= self.chunk_size and torch.is_grad_enabled():
                # No step closes before the last token (Eq. 71), so no output reads one: the loss's gradient in
                # eta's and the target's parameters is exactly zero, and autograd would leave them unused (no
                # .grad), which DDP without find_unused_parameters (HF Trainer's setting under activation
                # checkpointing) refuses. The zero is made explicit; the values are unchanged.
                y = y + 0.0 * (self.p_v.sum() + self.w_eta.sum() + self.b_eta.sum())
                if self.training and not torch.compiler.is_compiling():
                    logger.warning_once(
                        f"a CMS level with chunk size {self.chunk_size} trains on sequences of {z.shape[1]} tokens: "
                        "it takes no in-context step a later token reads, so its eta and target parameters get zero "
                        "gradients; train on sequences longer than the chunk size for the level to learn in context"
                    )
            return y
        state = cache.cms[level]
        if z.shape[1] == 1 and state is not None:
            y, cache.cms[level] = cms_level_step(
                z[:, 0], *params, mask=None if valid is None else valid[:, 0], state=state, **kwargs
            )
            return y.unsqueeze(1)
        y, cache.cms[level] = cms_level(z, *params, mask=valid, state=state, output_final_state=True, **kwargs)
        return y


class CMS(nn.Module):
    """All levels of one block, with their pre-norm residuals.

    "sequential" (Eq. 30): h <- h + MLP_l(RMSNorm_l(h)) for l = 1..k.
    "independent" (Eq. 74): h + Σ_l w_l MLP_l(RMSNorm(h)), w_l learned.
    """

    def __init__(self, config):
        super().__init__()
        self.variant = config.cms_variant
        D = config.hidden_size
        self.levels = nn.ModuleList(
            CMSLevel(D, config.cms_hidden_size[l], size, config.cms_eta_max[l], config.cms_decay[l],
                     config.cms_objective, config.cms_step, config.kernel_backend, config.cms_in_context)
            for l, size in enumerate(config.cms_chunk_sizes)
        )
        if self.variant == "sequential":
            self.norms = nn.ModuleList(RMSNorm(D, config.rms_norm_eps) for _ in self.levels)
        else:
            self.norm = RMSNorm(D, config.rms_norm_eps)
            self.level_weights = nn.Parameter(torch.ones(len(self.levels)))

    def forward(self, h: Tensor, valid: Optional[Tensor], cache: Optional[HopeLayerCache]) -> Tensor:
        """h: (B, T, D) -> (B, T, D)."""
        if cache is not None and not cache.cms:
            cache.cms = [None] * len(self.levels)
        if self.variant == "sequential":
            for l, (norm, level) in enumerate(zip(self.norms, self.levels)):
                h = h + level(norm(h), valid, cache, l)
            return h
        z = self.norm(h)
        update = sum(self.level_weights[l] * level(z, valid, cache, l) for l, level in enumerate(self.levels))
        return h + update
