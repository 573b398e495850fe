"""Small building blocks shared by the mixers and the CMS: RMSNorm, causal short convolution, RoPE."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, computed in fp32 (fp64 for fp64 inputs, as every op's compute dtype)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        xc = x.to(dtype)
        xc = xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xc * self.weight.to(dtype)).to(x.dtype)


def _depthwise(window: Tensor, weight: Tensor) -> Tensor:
    """(B, T + K - 1, D) -> (B, T, D): the depthwise convolution, on contiguous (B, D, T) input and (B, T, D) output.
    On CPU conv1d takes about twice as long, forward and backward, on the transposed view, and a transposed
    output makes every element-wise op after it (silu, the l2 norm of q) mix layouts: q's conv and its norm went
    from 16.4 to 9.5 ms forward+backward at B = 4, T = 512, D = 256 (one thread)."""
    return F.conv1d(window.mT.contiguous(), weight, groups=window.shape[-1]).mT.contiguous()


class ShortConv(nn.Module):
    """Depthwise causal convolution over time (SPEC §2, `conv_size`); its cache is the last K-1 inputs."""

    def __init__(self, dim: int, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(dim, 1, kernel_size))

    def forward(
        self, x: Tensor, tail: Optional[Tensor] = None, valid: Optional[Tensor] = None
    ) -> tuple[Tensor, Tensor]:
        """x: (B, T, D); tail: (B, K-1, D) inputs before x (zeros at the sequence start); valid: (B, T) bool.

        Returns the convolved (B, T, D) and the new tail (B, K-1, D). A masked token changes no state
        (SPEC §5): each valid token convolves the K-1 valid inputs before it, and the tail keeps valid
        inputs only. Outputs at masked positions are unspecified.
        """
        B, T, D = x.shape
        K1 = self.kernel_size - 1
        if tail is None:
            tail = x.new_zeros(B, K1, D)
        window = torch.cat([tail.to(x.dtype), x], dim=1)
        weight = self.weight.to(x.dtype)
        if valid is None:
            return _depthwise(window, weight), window[:, window.shape[1] - K1 :]
        # Pack every row's valid inputs to the front (the tail counts as valid), convolve, and read each token's
        # output back at its packed index; masked inputs land in one dump slot that is dropped.
        keep = torch.cat([valid.new_ones(B, K1, dtype=torch.bool), valid.bool()], dim=1)
        rank = keep.long().cumsum(1) - 1
        length = K1 + T
        dest = torch.where(keep, rank, torch.full_like(rank, length))
        packed = window.new_zeros(B, length + 1, D).scatter(1, dest.unsqueeze(-1).expand(-1, -1, D), window)
        packed = packed[:, :length]
        y_packed = _depthwise(packed, weight)  # (B, T, D)
        y = y_packed.gather(1, (rank[:, K1:] - K1).clamp_min(0).unsqueeze(-1).expand(-1, -1, D))
        last = keep.sum(1, keepdim=True) - K1 + torch.arange(K1, device=x.device)  # the K-1 last valid inputs
        return y, packed.gather(1, last.unsqueeze(-1).expand(-1, -1, D))


def rotary_tables(positions: Tensor, dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin of RoPE for integer positions (T,): each (T, dim), in float64 (cast where applied)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float64) / dim))
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (B, H, T, d) by the tables (T, d) (the half-split RoPE layout), in at least fp32."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    dtype = torch.promote_types(x.dtype, torch.float32)
    return (x.to(dtype) * cos.to(dtype) + rotated.to(dtype) * sin.to(dtype)).to(x.dtype)
