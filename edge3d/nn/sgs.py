"""Similarity-guided sampling (SGS, Fayyaz et al., "3D CNNs with Adaptive Temporal Feature
Resolutions", Sec. 4), in chunk mode.

Per chunk of K frames: spatial global average pooling, a small embedding network (two 1×1
convs C→C→L with a ReLU between, written as linear layers on the pooled vectors), magnitudes
Δ_t = ||Z_t||, half bin width γ = Δ_max / (2B), centres β_b = (2b−1)γ, the linear kernel
Ψ_tb = max(0, 1 − |Δ_t − β_b| / γ), and bins O_b = Σ_t Ψ_tb · I_t. Bins no frame reaches
(Σ_t Ψ_tb = 0) are dropped, so B' ≤ B varies per chunk.

Two choices the paper leaves open, made here so that SGS is total and NaN-free:
- Δ is clamped to [β_1, β_B] before the kernel. Δ_max itself sits on bin B's outer edge,
  where the paper's kernel is 0; without the clamp the most-different frame of every chunk,
  and every frame of a static chunk, would be dropped (a static chunk would give B' = 0).
- Δ_max = 0 (all embeddings zero): γ would be 0; then every frame goes to bin 1 with weight 1.

Clip mode (``forward``) returns all B bins and the occupancy mask; dropping the empty bins
(the dynamic, variable-B' reference) is :meth:`SimilarityGuidedSampling.select`. The
fixed-shape streaming form (``edge3d.staged_sgs``) compacts occupied bins to the front instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SimilarityGuidedSampling(nn.Module):
    """SGS over chunks of ``chunk`` frames into at most ``bins`` bins (B = K by default)."""

    def __init__(self, channels: int, embed_dim: int = 8, bins: int = 8, chunk: int | None = None) -> None:
        super().__init__()
        self.channels, self.embed_dim, self.bins = channels, embed_dim, bins
        self.chunk = bins if chunk is None else chunk
        if self.bins < 1 or self.chunk < 1:
            raise ValueError(f"SimilarityGuidedSampling: bins and chunk must be >= 1, got {bins}, {chunk}")
        self.fc1 = nn.Linear(channels, channels)
        self.fc2 = nn.Linear(channels, embed_dim)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, embed_dim={self.embed_dim}, bins={self.bins}, chunk={self.chunk}"

    def magnitudes(self, pooled: torch.Tensor) -> torch.Tensor:
        """Δ (N, T) from spatially pooled features (N, T, C)."""
        z = self.fc2(F.relu(self.fc1(pooled)))
        return torch.sqrt((z * z).sum(-1))

    def kernel(self, pooled: torch.Tensor) -> torch.Tensor:
        """Sampling weights Ψ (N, T, B) from pooled features (N, T, C)."""
        delta = self.magnitudes(pooled)
        n, t = delta.shape
        B = self.bins
        gamma = delta.amax(dim=1, keepdim=True) / (2 * B)  # (N, 1)
        b = torch.arange(1, B + 1, dtype=delta.dtype, device=delta.device).view(1, B)
        beta = (2 * b - 1) * gamma  # (N, B)
        ok = gamma > 0
        g = torch.where(ok, gamma, torch.ones_like(gamma))
        d = torch.minimum(torch.maximum(delta, gamma), (2 * B - 1) * gamma)  # clamp to [β_1, β_B]
        psi = F.relu(1 - (d.unsqueeze(-1) - beta.unsqueeze(1)).abs() / g.unsqueeze(-1))
        first = (b == 1).to(delta.dtype).view(1, 1, B).expand(n, t, B)
        return torch.where(ok.unsqueeze(-1), psi, first)

    @staticmethod
    def occupied(psi: torch.Tensor) -> torch.Tensor:
        """Mask (N, B) of bins some frame reaches."""
        return psi.sum(dim=1) > 0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip (N, C, T, H, W) of one chunk -> all bins (N, C, B, H, W) and the occupancy mask (N, B)."""
        if x.dim() != 5:
            raise ValueError(f"SimilarityGuidedSampling expects a clip (N, C, T, H, W), got {tuple(x.shape)}")
        psi = self.kernel(x.mean(dim=(-2, -1)).transpose(1, 2))
        return torch.einsum("ncthw,ntb->ncbhw", x, psi), self.occupied(psi)

    @staticmethod
    def select(bins: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Drop the empty bins of one sample: (1, C, B, H, W) -> (1, C, B', H, W)."""
        if bins.shape[0] != 1:
            raise ValueError("select works on one sample: B' differs between samples.")
        return bins[:, :, mask[0]]


def compaction(mask: torch.Tensor) -> torch.Tensor:
    """Selection matrix P (N, B, B) moving occupied bins to the front, in order.

    P[j, b] = mask_b · [cumsum(mask)_b − 1 == j]; rows j ≥ B' are zero. Fixed-shape, so the
    exported graph needs no data-dependent shapes.
    """
    m = mask.to(torch.float32)
    B = m.shape[1]
    pos = torch.cumsum(m, dim=1) - 1  # (N, B)
    j = torch.arange(B, dtype=m.dtype, device=m.device).view(1, B, 1)
    return (pos.unsqueeze(1) == j).to(m.dtype) * m.unsqueeze(1)
