"""Replay alignment (Wu et al. 2018) on the base subspace: stay where the frozen parent was."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def loss_replay(images: torch.Tensor, parent_images: torch.Tensor, perceptual: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel L2, perceptual) distances to the frozen parent's images for the same latents, batch means."""
    parent_images = parent_images.detach()
    loss_l2 = (images - parent_images).square().mean()
    loss_perceptual = perceptual(images, parent_images).mean()
    return loss_l2, loss_perceptual


def loss_lowpass_change(domain_images: torch.Tensor, base_images: torch.Tensor, size: int = 8) -> torch.Tensor:
    """Mean squared change of the images' low frequencies (average-pooled to ``size`` x ``size``)
    between a domain's images and the base-subspace images of the same latents (a detached target).

    Why: a domain that adds an object (glasses, a hat) should not regrade the whole picture, yet a
    CLIP direction is also paid by global colour and contrast shifts, which is how such domains came
    to read as another, global domain (pop art) in the world. Pooled to a few cells, a small object
    barely moves this distance while a background or skin-tone shift does. Resolution-independent.

    domain_images, base_images: (B, 3, H, W) in [-1, 1]; returns a scalar.
    """
    pooled_domain = F.adaptive_avg_pool2d(domain_images, size)  # (B, 3, size, size)
    pooled_base = F.adaptive_avg_pool2d(base_images.detach(), size)  # (B, 3, size, size)
    return (pooled_domain - pooled_base).square().mean()


def loss_edit_detail(domain_images: torch.Tensor, base_images: torch.Tensor, size: int = 8) -> torch.Tensor:
    """Mean square of the detail of an edit: the change from the base-subspace images of the same
    latents (a detached target) minus that change average-pooled to ``size`` x ``size`` cells and
    bilinearly upsampled back, i.e. whatever the edit does at scales finer than a cell.

    Why: a domain that recolours (blue skin) should tint regions, not paint a texture; with the small
    world CLIPs, blue skin learned a blotched blue and white mask, which the classifier reads as
    freckles. A smooth tint has almost no detail at this scale, blotches and speckles have much; the
    outlines of a tinted region pay a little. Resolution-independent, like :func:`loss_lowpass_change`.

    domain_images, base_images: (B, 3, H, W) in [-1, 1]; returns a scalar.
    """
    edit = domain_images - base_images.detach()  # (B, 3, H, W)
    smooth = F.interpolate(F.adaptive_avg_pool2d(edit, size), size=edit.shape[-2:], mode="bilinear", align_corners=False)  # (B, 3, H, W)
    return (edit - smooth).square().mean()
