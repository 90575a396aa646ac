"""Perceptual distances with the ``lpips.LPIPS`` call signature: ``distance(a, b)`` on [-1, 1] images.

Real models use the ``lpips`` package (VGG or AlexNet backbone, whose ImageNet weights torchvision
downloads once on a connected machine); models of the portraits world use the world's own
perceptual network, trained in the world and shipped with the package.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from ..checkpoint import ExpandedGenerator

PerceptualDistance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NAMES = ("auto", "world", "lpips-vgg", "lpips-alex")


def lpips_distance(net: str = "vgg", pretrained: bool = True) -> torch.nn.Module:
    """``lpips.LPIPS`` frozen in eval mode. ``pretrained=False`` builds random weights (tests, offline)."""
    import lpips

    model = lpips.LPIPS(net=net, pretrained=pretrained, pnet_rand=not pretrained, verbose=False).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def is_world_model(model: "ExpandedGenerator") -> bool:
    return model.base_model.startswith("expander/world")


def load_perceptual(name: str, model: "ExpandedGenerator | None" = None) -> PerceptualDistance:
    """Build the named distance; ``auto`` picks the world network for world models, else LPIPS-VGG."""
    if name not in NAMES:
        raise ValueError(f"unknown perceptual distance {name!r}; choose one of {list(NAMES)}")
    if name == "auto":
        name = "world" if model is not None and is_world_model(model) else "lpips-vgg"
    if name == "world":
        from ..world.models import load_world_perceptual

        return load_world_perceptual()
    return lpips_distance(net=name.split("-")[1])
