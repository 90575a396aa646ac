"""The latent basis of an expanded generator: SeFA directions, base and repurposed subspaces.

Notation (Nitzan et al. 2023, Sec. 3): V = [v_1 .. v_D] is an orthonormal basis of W sorted by
decreasing SeFA singular value; R = the columns repurposed for new domains, B = the others. Then

    w_base            = B B^T w + R R^T mean  =  w - R R^T (w - mean)
    w in domain k     = w_base + alpha_k * s * v_k          (s: strength, 1 during training)
    composition k, j  = w_base + alpha_k s_k v_k + alpha_j s_j v_j

All functions accept w (B, D) or w+ (B, L, D): the basis acts on the last dimension.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
from torch import nn


class LatentBasis(nn.Module):
    """Orthonormal basis of W (buffers, saved in the checkpoint) and the subspace operations on it.

    ``directions``: (D, D) with ``directions[:, k] = v_k``; ``singular_values``: (D,) decreasing;
    ``mean``: (D,) the mean w that repurposed coordinates are pinned to; ``repurposed``: the
    indices of R, which the expanded generator keeps in sync with its domains.
    """

    def __init__(self, style_dim: int):
        super().__init__()
        self.register_buffer("directions", torch.eye(style_dim))
        self.register_buffer("singular_values", torch.ones(style_dim))
        self.register_buffer("mean", torch.zeros(style_dim))
        # Perceptual change per direction (the dormancy curve); empty until measured.
        self.register_buffer("dormancy", torch.zeros(0))
        self.repurposed: list[int] = []

    @classmethod
    def from_sefa(cls, directions: torch.Tensor, singular_values: torch.Tensor, mean: torch.Tensor) -> "LatentBasis":
        basis = cls(directions.shape[0])
        basis.directions.copy_(directions)
        basis.singular_values.copy_(singular_values)
        basis.mean.copy_(mean)
        return basis

    @property
    def style_dim(self) -> int:
        return self.directions.shape[0]

    def check_index(self, index: int) -> int:
        if not 0 <= int(index) < self.style_dim:
            raise IndexError(f"direction {index} is out of range: this latent space has directions 0..{self.style_dim - 1}")
        return int(index)

    def set_repurposed(self, indices: Iterable[int]) -> None:
        indices = [self.check_index(i) for i in indices]
        if len(set(indices)) != len(indices):
            raise ValueError(f"repurposed directions must be unique, got {indices}")
        self.repurposed = sorted(indices)

    def dormant_order(self) -> list[int]:
        """Direction indices from most to least dormant (by the measured curve, else by singular value)."""
        if self.dormancy.numel() == self.style_dim:
            return torch.argsort(self.dormancy, stable=True).tolist()
        return list(range(self.style_dim - 1, -1, -1))

    # ---- subspace operations --------------------------------------------------------------------

    def coordinates(self, w: torch.Tensor) -> torch.Tensor:
        """Coordinates of w in the basis: (..., D) -> (..., D)."""
        return w @ self.directions

    def project_base(self, w: torch.Tensor, repurposed: Optional[Sequence[int]] = None) -> torch.Tensor:
        """w_base = w - R R^T (w - mean). With no repurposed directions this is the identity."""
        indices = self.repurposed if repurposed is None else list(repurposed)
        if not indices:
            return w
        R = self.directions[:, indices]  # (D, |R|)
        return w - ((w - self.mean) @ R) @ R.t()

    def offset(self, shifts: dict[int, float] | Sequence[tuple[int, float]]) -> torch.Tensor:
        """Sum of ``amount * v_k`` over ``{direction k: amount}``: (D,)."""
        items = shifts.items() if isinstance(shifts, dict) else shifts
        total = torch.zeros_like(self.mean)
        for index, amount in items:
            total = total + float(amount) * self.directions[:, self.check_index(index)]
        return total

    def repurposed_latent(self, w: torch.Tensor, shifts: dict[int, float] | Sequence[tuple[int, float]]) -> torch.Tensor:
        """Latent in the repurposed subspace(s): ``project_base(w) + sum amount_k v_k``.

        ``shifts`` maps a direction index to ``alpha_k * strength_k``; several entries compose domains.
        """
        return self.project_base(w) + self.offset(shifts)

    def traverse(self, w: torch.Tensor, index: int, amounts: torch.Tensor) -> torch.Tensor:
        """Continuous traversal along v_index from the base subspace.

        w: (B, D) or (B, L, D); amounts: (S,) -> (B, S, D) or (B, S, L, D).
        """
        base = self.project_base(w).unsqueeze(1)  # (B, 1, ...)
        v = self.directions[:, self.check_index(index)]
        steps = amounts.to(w).view(1, -1, *([1] * (w.ndim - 1)))  # (1, S, 1[, 1])
        return base + steps * v


def sefa(affine_weights: Iterable[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """SeFA (Shen & Zhou 2021) on the concatenated style affine weights.

    affine_weights: tensors (C_i, D). Returns ``directions`` (D, D), orthonormal columns sorted by
    decreasing singular value, and ``singular_values`` (D,) (zero-padded when sum C_i < D). Signs are
    fixed (largest-magnitude component positive) so the basis is deterministic across runs.
    """
    stacked = torch.cat([w.detach().float().cpu() for w in affine_weights], dim=0)  # (sum C_i, D)
    dim = stacked.shape[1]
    # float64 so the small singular values that define dormancy are resolved accurately.
    _, singular_values, vh = torch.linalg.svd(stacked.double(), full_matrices=True)
    directions = vh.t()  # (D, D), column k is v_k
    padded = torch.zeros(dim, dtype=torch.float64)
    padded[: singular_values.shape[0]] = singular_values
    pivot = directions.abs().argmax(dim=0)
    signs = torch.sign(directions[pivot, torch.arange(dim)])
    directions = directions * signs
    return directions.float().contiguous(), padded.float()
