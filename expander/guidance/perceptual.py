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

# (images_a, images_b) in [-1, 1], (B, 3, H, W) each -> distance per pair, any shape with B elements.
PerceptualDistance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NAMES = ("auto", "world", "lpips-vgg", "lpips-alex")


class LpipsDistance(torch.nn.Module):
    """``lpips.LPIPS`` frozen in eval mode, upsampling images below ``min_size`` first.

    Why: LPIPS' deepest AlexNet/VGG layers need inputs of about 32 px or more (AlexNet's stride-4 stem
    and three max-pools leave nothing of a 16 px image); real generators are far larger, tiny test
    models are not.
    """

    def __init__(self, net: str = "vgg", pretrained: bool = True, min_size: int = 64):
        super().__init__()
        import lpips

        self.lpips = lpips.LPIPS(net=net, pretrained=pretrained, pnet_rand=not pretrained, verbose=False).eval()
        self.min_size = min_size
        self.requires_grad_(False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # (B,3,H,W) x2 in [-1, 1] -> (B,1,1,1)
        if min(a.shape[-2:]) < self.min_size:
            a = torch.nn.functional.interpolate(a, size=(self.min_size, self.min_size), mode="bilinear", align_corners=False)
            b = torch.nn.functional.interpolate(b, size=(self.min_size, self.min_size), mode="bilinear", align_corners=False)
        return self.lpips(a, b)


def lpips_distance(net: str = "vgg", pretrained: bool = True) -> torch.nn.Module:
    """LPIPS with an AlexNet or VGG backbone. ``pretrained=False`` builds random weights (tests, offline)."""
    return LpipsDistance(net, pretrained).eval()


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
