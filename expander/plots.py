"""Plots for the CLI and the benchmarks (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .checkpoint import ExpandedGenerator


def plot_directions(model: "ExpandedGenerator", curve: torch.Tensor, out: str | Path) -> Path:
    """SeFA singular values and the dormancy curve side by side; repurposed directions marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    index = range(model.basis.style_dim)
    left.semilogy(index, model.basis.singular_values.clamp_min(1e-12).numpy(), color="tab:blue")
    left.set(title="SeFA spectrum", xlabel="direction (sorted)", ylabel="singular value")
    right.plot(index, curve.numpy(), color="tab:orange", label="perceptual change")
    for domain in model.domains:
        right.axvline(domain.direction, color="tab:green", alpha=0.35, lw=1)
    # The dormant set is the num_dormant directions that change images least by the plotted curve,
    # which need not be the last indices (SeFA's order is by singular value, not by change).
    dormant = torch.argsort(curve, stable=True)[: model.num_dormant] if curve.numel() == model.basis.style_dim else torch.tensor(model.dormant_directions())
    right.scatter(dormant.numpy(), curve[dormant].numpy(), s=9, color="grey", zorder=3, label=f"the {len(dormant)} dormant directions")
    right.set(title="dormancy curve (mean change per direction)", xlabel="direction (sorted)", ylabel="distance")
    right.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
