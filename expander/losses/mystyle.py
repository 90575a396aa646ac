"""MyStyle (Nitzan et al. 2022), few-shot personalisation: invert the subject's images into W with the
parent generator; training then reconstructs them from the domain's repurposed subspace."""

from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from ..generators.stylegan2 import Generator
from .replay import loss_replay


def invert_images(
    generator: Generator,
    images: torch.Tensor,
    perceptual: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    steps: int = 200,
    lr: float = 0.05,
    lambda_l2: float = 1.0,
    progress: bool = True,
) -> torch.Tensor:
    """Optimise one w per image (starting at the mean w) to reconstruct it: (N, 3, R, R) -> (N, D).

    The generator is frozen while it runs (each parameter's ``requires_grad`` is restored after, so a
    caller that trains it next still can); the result lies in W (not W+), as the subspaces are
    defined in W.
    """
    trainable = {name: p.requires_grad for name, p in generator.named_parameters()}
    generator.requires_grad_(False)
    try:
        w = generator.w_avg.detach().clone().unsqueeze(0).repeat(len(images), 1).requires_grad_(True)
        optimizer = torch.optim.Adam([w], lr=lr)
        for _ in tqdm(range(steps), disable=not progress, desc="inverting images"):
            reconstruction = generator.synthesis(w)
            loss = perceptual(reconstruction, images).mean() + lambda_l2 * (reconstruction - images).square().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    finally:
        for name, p in generator.named_parameters():
            p.requires_grad_(trainable[name])
    return w.detach()


def loss_mystyle(domain_images: torch.Tensor, targets: torch.Tensor, perceptual: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Reconstruction of the subject's photos from their inversions projected onto the domain's subspace:
    pixel L2 + perceptual, equally weighted, the distance replay holds the base subspace to.

    domain_images, targets: (B, 3, R, R) in [-1, 1], paired; the targets are the photos (detached).
    """
    loss_l2, loss_perceptual = loss_replay(domain_images, targets, perceptual)
    return loss_l2 + loss_perceptual
