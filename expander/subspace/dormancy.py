"""The dormancy curve (Nitzan et al. 2023, Fig. 12): how much each SeFA direction changes images."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..generators.stylegan2 import Generator
from ..guidance.perceptual import PerceptualDistance
from .basis import LatentBasis


@torch.no_grad()
def latent_step_size(generator: Generator, basis: LatentBasis, step_scale: float = 3.0, n_samples: int = 2048, seed: int = 0) -> float:
    """Traversal step used by the curve: ``step_scale`` times the RMS (over directions) of the std of
    w's coordinates, so the step is comparable across generators whatever the scale of their W."""
    rng = torch.Generator().manual_seed(seed)
    z = torch.randn(n_samples, generator.style_dim, generator=rng).to(basis.mean.device)
    coords = basis.coordinates(generator.mapping(z))  # (N, D)
    return float(step_scale * coords.std(0).square().mean().sqrt())


@torch.no_grad()
def dormancy_curve(
    generator: Generator,
    basis: LatentBasis,
    distance: PerceptualDistance,
    n_samples: int = 16,  # random w per direction
    step_scale: float = 3.0,  # step in units of the typical per-direction std of w
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = True,
) -> torch.Tensor:
    """Mean perceptual change when w moves by a fixed step along each basis direction: (D,).

    The same ``n_samples`` latents (seeded) are used for every direction, so the curve is
    deterministic for a seed and differences between directions are not sampling noise.
    """
    device = basis.mean.device
    if isinstance(distance, torch.nn.Module):
        distance.to(device)  # load_perceptual builds it on the CPU; the renders are on the basis' device
    step = latent_step_size(generator, basis, step_scale, seed=seed)
    rng = torch.Generator().manual_seed(seed + 1)
    w = generator.mapping(torch.randn(n_samples, generator.style_dim, generator=rng).to(basis.mean))  # (N, D), the basis' device and dtype
    reference = generator.synthesis(w)  # (N, 3, H, W)
    dim = basis.style_dim
    curve = torch.zeros(dim)
    # Work through (direction, sample) pairs in batches: pair p is direction p // N, sample p % N.
    pairs = torch.arange(dim * n_samples)
    for chunk in tqdm(pairs.split(batch_size), disable=not progress, desc="dormancy curve"):
        direction, sample = chunk // n_samples, chunk % n_samples
        moved = w[sample] + step * basis.directions[:, direction].t()  # (b, D)
        change = distance(generator.synthesis(moved), reference[sample]).reshape(-1).float().cpu()
        curve.index_add_(0, direction, change)
    return curve / n_samples
