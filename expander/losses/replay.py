"""Replay alignment (Wu et al. 2018) on the base subspace: stay where the frozen parent was."""

from __future__ import annotations

from typing import Callable

import torch


def loss_replay(images: torch.Tensor, parent_images: torch.Tensor, perceptual: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel L2, perceptual) distances to the frozen parent's images for the same latents, batch means."""
    parent_images = parent_images.detach()
    loss_l2 = (images - parent_images).square().mean()
    loss_perceptual = perceptual(images, parent_images).mean()
    return loss_l2, loss_perceptual
