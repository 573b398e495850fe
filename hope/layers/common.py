"""Small building blocks shared by the mixers and the CMS: RMSNorm, causal short convolution, RoPE."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(x.dtype)


class ShortConv(nn.Module):
    """Depthwise causal convolution over time (SPEC §2, `conv_size`); its cache is the last K-1 inputs."""

    def __init__(self, dim: int, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(dim, 1, kernel_size))

    def forward(self, x: Tensor, tail: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """x: (B, T, D); tail: (B, K-1, D) inputs before x (zeros at the sequence start).

        Returns the convolved (B, T, D) and the new tail (B, K-1, D).
        """
        B, T, D = x.shape
        if tail is None:
            tail = x.new_zeros(B, self.kernel_size - 1, D)
        window = torch.cat([tail.to(x.dtype), x], dim=1)
        y = F.conv1d(window.transpose(1, 2), self.weight.to(x.dtype), groups=D).transpose(1, 2)
        return y, window[:, window.shape[1] - (self.kernel_size - 1) :]


def rotary_tables(positions: Tensor, dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin of RoPE for integer positions (T,): each (T, dim)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim))
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (B, H, T, d) by the tables (T, d) (the half-split RoPE layout)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)
