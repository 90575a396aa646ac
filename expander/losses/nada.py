"""StyleGAN-NADA's directional CLIP loss, in its expansion form (Nitzan et al., appendix D.2).

The image direction is (domain image - base-subspace image of the *same* generator for the same w):
the base subspace keeps the source domain alive, so no frozen source generator is needed.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..guidance.clip import ClipGuidance


def nada_image_features(guidance: ClipGuidance, domain_images: torch.Tensor, base_images: torch.Tensor, rng: Optional[torch.Generator] = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per CLIP of the ensemble, the (V*B, D) embeddings of the domain images and of the base images
    (detached), on the same paired augmented views: what NADA's directions and the consistency loss
    are both computed from, so each image is encoded once per step.

    domain_images, base_images: (B, 3, H, W) in [-1, 1], paired by latent; V = the guidance's
    augmented views (1 when off), in view-major order (row v * B + b is view v of latent b).
    """
    domain_images, base_images = guidance.augment(domain_images, base_images.detach(), rng)  # paired views (off by default)
    return [(encoder.encode_images(domain_images), encoder.encode_images(base_images).detach()) for encoder in guidance.encoders]


def nada_image_directions(guidance: ClipGuidance, domain_images: torch.Tensor, base_images: torch.Tensor, rng: Optional[torch.Generator] = None, features: Optional[Sequence[tuple[torch.Tensor, torch.Tensor]]] = None) -> list[torch.Tensor]:
    """One (V*B, D) image direction per CLIP of the ensemble: CLIP(domain) - CLIP(base), unit rows
    for the cosine loss, differentiable w.r.t. ``domain_images`` only.

    domain_images, base_images: (B, 3, H, W) in [-1, 1], paired by latent; ``features``: the output
    of :func:`nada_image_features` for these images, when the caller has computed it already.
    """
    if features is None:
        features = nada_image_features(guidance, domain_images, base_images, rng)
    directions = []
    for domain_features, base_features in features:
        direction = domain_features - base_features  # (V*B, D)
        directions.append(F.normalize(direction, dim=-1) if guidance.direction_loss == "cosine" else direction)
    return directions


def loss_nada_consistency(features: Sequence[tuple[torch.Tensor, torch.Tensor]], batch: int, temperature: float = 0.1) -> torch.Tensor:
    """Cross-domain consistency (Ojha et al. 2021, "Few-shot image generation via cross-domain
    correspondence"), in CLIP space: for each latent, the softmax over how similar the *other*
    latents of the batch are to it must stay what it is in the base subspace,
    ``KL(p_base || p_domain)``, averaged over anchors, views and the CLIP ensemble.

    Why: NADA's loss is met by one template image that moves every sample along the text direction,
    whoever the sample was; in the world, 10 jointly trained domains collapsed to templates (CLIP
    similarity between a domain's samples 0.97-0.99 against 0.84 in the base, uncorrelated with the
    base's), and templates do not compose. This keeps who is similar to whom, not what they look
    like, so whole-image styles stay free.

    features: per CLIP, (domain, base) embeddings (V*B, D) in view-major order
    (:func:`nada_image_features`); batch: B, the latents per view. Needs B >= 3 (two others to rank).
    """
    total = features[0][0].new_zeros(())
    if batch < 3:
        return total
    others = ~torch.eye(batch, dtype=torch.bool, device=total.device)  # (B, B)

    def log_neighbours(embeddings: torch.Tensor) -> torch.Tensor:
        unit = F.normalize(embeddings, dim=-1).reshape(-1, batch, embeddings.shape[-1])  # (V, B, D)
        similarity = (unit @ unit.transpose(1, 2))[:, others].reshape(-1, batch, batch - 1)  # (V, B, B-1): self left out
        return F.log_softmax(similarity / temperature, dim=-1)

    for domain_features, base_features in features:
        # KL(p_base || p_domain) per anchor: (V, B, B-1) summed over the neighbours
        kl = F.kl_div(log_neighbours(domain_features), log_neighbours(base_features.detach()), reduction="none", log_target=True)
        total = total + kl.sum(-1).mean()
    return total / len(features)


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
    image_directions: Optional[Sequence[torch.Tensor]] = None,
    dual_ridge: Optional[float] = None,
) -> torch.Tensor:
    """1 - cos(image direction, text direction) (or its unnormalised projection form, see
    ``ClipGuidance.direction_loss``), averaged over the batch and the CLIP ensemble.

    ``contrast_strength`` / ``dual_ridge``: how the ``contrast_prompts`` (the model's other domains)
    shape the text direction, see ``ClipGuidance.text_direction``.

    ``exclusive_weight`` > 0 adds ``weight * sum_j relu(<image direction, e_j>)`` over the
    ``contrast_prompts``' exclusive directions e_j (``ClipGuidance.exclusive_directions``): a hinge
    that stops this domain from drawing what only the *other* domains ask for.

    domain_images, base_images: (B, 3, H, W) in [-1, 1], paired by latent; base images are a reference
    (detached), so this loss only pulls the domain subspace. ``image_directions``: the output of
    :func:`nada_image_directions` for these images, when the caller has computed it already.
    """
    if image_directions is None:
        image_directions = nada_image_directions(guidance, domain_images, base_images, rng)
    total = domain_images.new_zeros(())
    for encoder, image_direction in zip(guidance.encoders, image_directions):
        text_direction = guidance.text_direction(encoder, source_prompt, target_prompt, contrast_prompts, contrast_strength, dual_ridge).to(image_direction.device)  # (D,)
        agreement = image_direction @ text_direction  # (V*B,)
        if guidance.max_projection is not None:
            agreement = agreement.clamp(max=guidance.max_projection)  # hinge: no gradient past the cap
        total = total + (1 - agreement).mean()
        if exclusive_weight > 0 and contrast_prompts:
            exclusive = guidance.exclusive_directions(encoder, source_prompt, target_prompt, contrast_prompts).to(image_direction.device)  # (C, D)
            total = total + exclusive_weight * (image_direction @ exclusive.T).relu().sum(-1).mean()
    return total / len(guidance.encoders)


def loss_nada_negative(
    guidance: ClipGuidance,
    image_directions: Sequence[torch.Tensor],
    source_prompt: str,
    target_prompt: str,
    negative_prompts: Sequence[str],
) -> torch.Tensor:
    """``sum_n relu(<image direction, e_n>)``, averaged over the batch and the CLIP ensemble: a hinge
    against drawing what the user's ``negative_prompts`` describe ("a portrait of a person wearing
    sunglasses" for an eyepatch domain), the NADA counterpart of a diffusion negative prompt.

    e_n: the direction from the source prompt to negative prompt n, minus its component along this
    domain's own (plain) text direction, normalised (``ClipGuidance.exclusive_directions``), so what
    the target's text shares with a negative (an eyepatch and sunglasses both darken the eyes'
    region) is still free and only what the negative adds stops paying. Zero while the domain's
    images do not move that way. With ``nada_dual_ridge`` or ``nada_contrast``, the direction
    :func:`loss_nada` rewards is not the plain one and may hold part of e_n; the hinge then trades
    against that part (benchmarks/negative_prompts.py measures both on renders).

    image_directions: per CLIP, (N, D) for this domain's images (:func:`nada_image_directions`).
    """
    total = image_directions[0].new_zeros(())
    if not negative_prompts:
        return total
    for encoder, image_direction in zip(guidance.encoders, image_directions):
        negatives = guidance.exclusive_directions(encoder, source_prompt, target_prompt, negative_prompts).to(image_direction.device)  # (C, D)
        total = total + (image_direction @ negatives.T).relu().sum(-1).mean()
    return total / len(guidance.encoders)


def loss_nada_image_exclusive(
    guidance: ClipGuidance,
    image_directions: Sequence[torch.Tensor],
    other_image_directions: Sequence[Sequence[torch.Tensor]],
    source_prompt: str,
    target_prompt: str,
) -> torch.Tensor:
    """``sum_j relu(<image direction, u_j>)``, averaged over the batch and the CLIP ensemble: a hinge
    against what the *other* domains of this step actually draw.

    u_j: the mean image direction of another domain j in this step (detached), minus its component
    along this domain's text direction, normalised. Why images and not only text (the ``exclusive``
    hinge of :func:`loss_nada`): a small CLIP's text directions share components, so drawing one
    domain's attribute (glasses) can still pay along another's text direction (beard); the CLIP
    features of what the glasses domain really draws are where that leak shows.

    image_directions: per CLIP, (N, D) for this domain; other_image_directions: per other domain, the
    same list for its own images.
    """
    total = image_directions[0].new_zeros(())
    if not other_image_directions:
        return total
    for index, (encoder, image_direction) in enumerate(zip(guidance.encoders, image_directions)):
        text_direction = guidance.text_direction(encoder, source_prompt, target_prompt).to(image_direction.device)  # (D,)
        others = torch.stack([directions[index].detach().mean(0) for directions in other_image_directions])  # (C, D)
        others = F.normalize(others - (others @ text_direction)[:, None] * text_direction, dim=-1)  # (C, D)
        total = total + (image_direction @ others.T).relu().sum(-1).mean()
    return total / len(guidance.encoders)


def loss_composed_edits(
    guidance: ClipGuidance,
    composed_images: torch.Tensor,
    domain_images: torch.Tensor,
    partner_images: torch.Tensor,
    base_images: torch.Tensor,
    rng: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Composed edits add up in CLIP space: the image of ``w + a_i v_i + a_j v_j`` should embed where
    ``e_i + e_j - e_base`` lies, i.e. adding domain j on top of domain i moves CLIP as adding j
    to the base image does, and the other way round (the two are one condition). Returns
    ``||e_ij - (e_i + e_j - e_base)||^2 / (||e_i - e_base||^2 + ||e_j - e_base||^2)``, averaged over
    the batch, the views and the CLIP ensemble: 0 when the edits add up, about 0.5 when the composed
    image shows only one of them.

    Why: trained one at a time, each domain learns a large style offset; composed, the two offsets
    take the synthesis network where no training sample was, and the stronger edit erases the other
    (measured in the world: eyepatch + glasses rendered exactly like eyepatch alone). Text
    directions cannot tell what to keep; each domain's own image edit of the same latent can.

    composed_images: (B, 3, H, W) of w + a_i v_i + a_j v_j, the only input that gets gradients;
    domain_images / partner_images / base_images: the same latents with only i / only j / neither
    (targets, detached). Views (``ClipGuidance.augment``) are shared by the four images of a latent.
    """
    # The four images of a latent must share one view: stacked on channels, they get one crop and one
    # noise (a noise of their own would put augmentation noise into the normaliser below).
    first, second = guidance.augment(torch.cat([composed_images, domain_images.detach()], 1), torch.cat([partner_images, base_images], 1).detach(), rng)  # (V*B, 6, H, W) x 2
    composed_views = first[:, :3]  # (V*B, 3, H, W)
    target_views = torch.cat([first[:, 3:], second[:, :3], second[:, 3:]])  # (3*V*B, 3, H, W): i, j, base
    total = composed_images.new_zeros(())
    for encoder in guidance.encoders:
        with torch.no_grad():
            e_i, e_j, e_base = encoder.encode_images(target_views).chunk(3)  # (V*B, D) each
        composed = encoder.encode_images(composed_views)  # (V*B, D)
        target = e_i + e_j - e_base
        scale = ((e_i - e_base).square().sum(-1) + (e_j - e_base).square().sum(-1)).clamp_min(1e-8)  # (V*B,)
        total = total + ((composed - target).square().sum(-1) / scale).mean()
    return total / len(guidance.encoders)
