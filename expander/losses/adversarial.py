"""The original StyleGAN2 losses, kept during expansion on base-subspace fakes (Nitzan et al., Sec. 3.3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def loss_g_nonsaturating(fake_logits: torch.Tensor) -> torch.Tensor:
    return F.softplus(-fake_logits).mean()


def loss_d_logistic(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()


def loss_r1(discriminator: torch.nn.Module, real: torch.Tensor) -> torch.Tensor:
    """Squared gradient norm of D at real images (batch mean)."""
    real = real.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(discriminator(real).sum(), real, create_graph=True)
    return grad.square().flatten(1).sum(1).mean()
