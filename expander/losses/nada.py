"""StyleGAN-NADA's directional CLIP loss, in its expansion form (Nitzan et al., appendix D.2).

The image direction is (domain image - base-subspace image of the *same* generator for the same w):
the base subspace keeps the source domain alive, so no frozen source generator is needed.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..guidance.clip import ClipGuidance


def loss_nada(
    guidance: ClipGuidance,
    domain_images: torch.Tensor,
    base_images: torch.Tensor,
    source_prompt: str,
    target_prompt: str,
    contrast_prompts: Sequence[str] = (),
    rng: Optional[torch.Generator] = None,
    contrast_strength: float = 1.0,
    exclusive_weight: float = 0.0,
) -> torch.Tensor:
    """1 - cos(image direction, text direction) (or its unnormalised projection form, see
    ``ClipGuidance.direction_loss``), averaged over the batch and the CLIP ensemble.

    ``exclusive_weight`` > 0 adds ``weight * sum_j relu(<image direction, e_j>)`` over the
    ``contrast_prompts``' exclusive directions e_j (``ClipGuidance.exclusive_directions``): a hinge
    that stops this domain from drawing what only the *other* domains ask for.

    domain_images, base_images: (B, 3, H, W) in [-1, 1], paired by latent; base images are a reference
    (detached), so this loss only pulls the domain subspace.
    """
    total = domain_images.new_zeros(())
    domain_images, base_images = guidance.augment(domain_images, base_images.detach(), rng)  # paired views (off by default)
    for encoder in guidance.encoders:
        text_direction = guidance.text_direction(encoder, source_prompt, target_prompt, contrast_prompts, contrast_strength).to(domain_images.device)  # (D,)
        image_direction = encoder.encode_images(domain_images) - encoder.encode_images(base_images.detach()).detach()  # (B, D)
        if guidance.direction_loss == "cosine":
            image_direction = F.normalize(image_direction, dim=-1)
        agreement = image_direction @ text_direction  # (B,)
        if guidance.max_projection is not None:
            agreement = agreement.clamp(max=guidance.max_projection)  # hinge: no gradient past the cap
        total = total + (1 - agreement).mean()
        if exclusive_weight > 0 and contrast_prompts:
            exclusive = guidance.exclusive_directions(encoder, source_prompt, target_prompt, contrast_prompts).to(domain_images.device)  # (C, D)
            total = total + exclusive_weight * (image_direction @ exclusive.T).relu().sum(-1).mean()
    return total / len(guidance.encoders)
