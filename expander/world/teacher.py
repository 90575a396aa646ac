"""The world's diffusion teacher for SDS: the exact posterior-mean denoiser of a captioned image bank.

Why not a trained UNet: a diffusion model small enough to train on a 2-core CPU in minutes would be
a poor, blurry teacher, and its errors would be indistinguishable from the method's. For a finite
bank {x_i} under the DDPM forward process x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps, the optimal
denoiser is known in closed form:

    E[x_0 | x_t, c] = sum_i softmax_i( -||x_t - sqrt(a_t) x_i||^2 / (2 (1 - a_t)) ) x_i   over bank images with caption c

and eps_hat = (x_t - sqrt(a_t) E[x_0 | x_t]) / sqrt(1 - a_t). Classifier-free guidance compares the
conditional bank (renders carrying the prompt's attributes) with the whole bank (unconditional).
It answers exactly the question SDS asks ("predict the noise of x_t for prompt c at step t") and
needs no training; the bank is rendered deterministically when the teacher is built.

The teacher works at 32x32 (``BANK_RESOLUTION``): enough to show every attribute, and 4x cheaper.
"""

from __future__ import annotations

import re
from typing import Optional

import torch
import torch.nn.functional as F

from . import renderer

BANK_RESOLUTION = 32
NUM_TRAIN_TIMESTEPS = 1000


def ddpm_alphas_cumprod(num_steps: int = NUM_TRAIN_TIMESTEPS, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """The linear DDPM schedule (Ho et al. 2020)."""
    return torch.cumprod(1 - torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64), 0).float()


def attributes_in_prompt(prompt: str) -> list[str]:
    """World attributes named in a prompt, by their paraphrases (longest phrases first)."""
    text = " " + re.sub(r"[^a-z ]", " ", prompt.lower()) + " "
    found = []
    for attribute, phrases in renderer.ATTRIBUTE_PHRASES.items():
        if any(f" {p.lower()} " in text for p in sorted(phrases, key=len, reverse=True)):
            found.append(attribute)
    return found


class WorldTeacher:
    """Posterior-mean denoiser over a bank of renders (see module docstring)."""

    num_train_timesteps = NUM_TRAIN_TIMESTEPS

    def __init__(self, per_attribute: int = 128, source: int = 512, seed: int = 1234):
        self.alphas_cumprod = ddpm_alphas_cumprod()
        rng = torch.Generator().manual_seed(seed)
        banks = [renderer.sample_portraits(source, rng, with_captions=False)]
        for attribute in renderer.ATTRIBUTES:
            banks.append(renderer.sample_portraits(per_attribute, rng, attributes=[attribute], with_captions=False))
        images = torch.cat([b.images for b in banks])
        self.labels = torch.cat([b.labels for b in banks])  # (N, A) bool
        self.bank = F.interpolate(images, size=BANK_RESOLUTION, mode="area").flatten(1)  # (N, 3*32*32)
        self.bank_sq = self.bank.square().sum(1)  # (N,)
        self._masks: dict[str, torch.Tensor] = {}

    def condition_mask(self, prompt: str) -> torch.Tensor:
        """Bank rows that match the prompt: every named attribute present. (N,) bool."""
        if prompt not in self._masks:
            wanted = attributes_in_prompt(prompt)
            if not wanted:
                raise ValueError(f"the world teacher knows no attribute in {prompt!r}; name one of {list(renderer.ATTRIBUTES)} (or a paraphrase)")
            index = [renderer.ATTRIBUTES.index(a) for a in wanted]
            mask = self.labels[:, index].all(dim=1)
            if not mask.any():
                raise ValueError(f"no bank image carries all of {wanted}; prompt one attribute per domain or compose domains")
            self._masks[prompt] = mask
        return self._masks[prompt]

    def check_prompt(self, prompt: str) -> None:
        """Raise a ValueError unless the prompt names attributes the bank holds together."""
        self.condition_mask(prompt)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images -> the teacher's pixel space (B, 3, 32, 32); differentiable.

        Not the bank's ``area`` resize: the antialiased bilinear one is sharper, and the same render
        lands about 2.0 (L2) from its bank encoding, against about 14 between bank neighbours, so even a
        render of a bank image gets a small pull towards sharper pixels. The shipped SDS results were
        measured with it; matching the two is a change to re-measure them with.
        """
        return F.interpolate(images, size=BANK_RESOLUTION, mode="bilinear", antialias=True, align_corners=False)

    def _posterior_mean(self, x_t: torch.Tensor, alpha_bar: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        flat = x_t.flatten(1)  # (B, P)
        bank = self.bank if mask is None else self.bank[mask]
        bank_sq = self.bank_sq if mask is None else self.bank_sq[mask]
        scale = alpha_bar.view(-1, 1)
        # ||x_t - sqrt(a) x_i||^2 without materialising (B, N, P).
        distance = flat.square().sum(1, keepdim=True) - 2 * scale.sqrt() * flat @ bank.t() + scale * bank_sq  # (B, N)
        weights = torch.softmax(-distance / (2 * (1 - scale)), dim=1)
        return (weights @ bank).view_as(x_t)

    def predict_noise(self, latents_t: torch.Tensor, t: torch.Tensor, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        alpha_bar = self.alphas_cumprod.to(latents_t)[t]  # (B,)
        a = alpha_bar.view(-1, 1, 1, 1)
        to_eps = lambda x0: (latents_t - a.sqrt() * x0) / (1 - a).sqrt()  # noqa: E731
        conditional = to_eps(self._posterior_mean(latents_t, alpha_bar, self.condition_mask(prompt)))
        unconditional = to_eps(self._posterior_mean(latents_t, alpha_bar, None))
        return conditional, unconditional

