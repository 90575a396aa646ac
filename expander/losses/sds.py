"""Score distillation (SDS) from a text-conditioned diffusion teacher, in its expansion form.

StyleGAN-Fusion (Song et al. 2022, Secs. 3.2-3.4): noise the (encoded) generated image at a timestep
t ~ U[t_min, t_max], ask the teacher for the classifier-free-guided noise prediction, and use
``w(t) * (eps_hat - eps)`` as the gradient of the image (DreamFusion's trick). The *directional
regularizer* keeps the guided prediction for the domain image close in direction to the one for
the same latent's base-subspace image (the expansion stand-in for the frozen source generator), at
the same t and noise; it prevents collapse to one image.

A teacher implements :class:`DiffusionTeacher`: the world's exact posterior-mean denoiser
(``expander.world.teacher``) or Stable Diffusion through diffusers (``expander.guidance.diffusion``).
"""

from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Optional, Protocol, Sequence, Union

import torch


class DiffusionTeacher(Protocol):
    alphas_cumprod: torch.Tensor  # (T,) DDPM cumulative alphas
    num_train_timesteps: int

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images (B, 3, H, W) -> the teacher's (differentiable) latents (B, C, h, w)."""

    def predict_noise(self, latents_t: torch.Tensor, t: torch.Tensor, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise predictions (conditional on ``prompt``, unconditional) for noisy latents at steps t."""

    # Optional, for teachers that cannot take any text (the world's knows a closed set of attributes):
    # ``check_prompt(prompt)`` raises a ValueError saying what it knows; called before training starts.


def sds_surrogate(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """A loss whose gradient w.r.t. x is exactly ``grad / B``: 0.5 ||x - (x - grad)||^2, batch mean.

    ``grad`` is a constant (detached); this is how a hand-made gradient enters autograd. Computed
    in float32: in bf16/fp16 latents (mixed precision), ``x - (x - grad)`` would round a small
    ``grad`` away next to a large ``x``.
    """
    x = x.float()
    target = (x - grad.float()).detach()
    return 0.5 * (x - target).square().flatten(1).sum(1).mean()


@dataclass
class SdsConfig:
    t_min: float = 0.02  # fraction of the teacher's training timesteps
    t_max: float = 0.5  # Fusion uses (0, 500) of 1000 for local-to-mid changes
    guidance_scale: float = 7.5
    lambda_directional: float = 1.0  # 0 disables the directional regularizer
    grad_clip: Optional[float] = 1.0  # clamp |grad| elementwise (None: off)

    def __post_init__(self) -> None:
        if not 0 <= self.t_min < self.t_max <= 1:
            raise ValueError(f"SdsConfig needs 0 <= t_min < t_max <= 1 (fractions of the teacher's timesteps), got t_min={self.t_min}, t_max={self.t_max}")
        if not (math.isfinite(self.guidance_scale) and self.guidance_scale >= 0) or not (math.isfinite(self.lambda_directional) and self.lambda_directional >= 0):
            raise ValueError(f"SdsConfig needs a finite guidance_scale >= 0 and lambda_directional >= 0, got {self.guidance_scale} and {self.lambda_directional}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"SdsConfig grad_clip must be > 0 (or None: no clamp), got {self.grad_clip}")


class ScoreDistillation:
    def __init__(self, teacher: DiffusionTeacher, config: Optional[SdsConfig] = None):
        self.teacher = teacher
        self.config = config or SdsConfig()

    def guided_noise(self, latents_t: torch.Tensor, t: torch.Tensor, prompt: Union[str, Sequence[str]], negative_prompts: Sequence[str] = ()) -> torch.Tensor:
        """Classifier-free guided noise prediction; several prompts are *composed* (Liu et al. 2022,
        composable diffusion): ``uncond + scale * (sum_k (cond_k - uncond) - sum_n (neg_n - uncond))``,
        so the sample is pulled towards every prompt at once instead of towards one that names them
        all (the world teacher has no image carrying two attributes, so it cannot answer a joint
        prompt), and pushed away from each of ``negative_prompts`` (composable diffusion's negation;
        one teacher call more per negative prompt)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("score distillation needs at least one prompt")
        cond, uncond = self.teacher.predict_noise(latents_t, t, prompts[0])
        guidance = cond - uncond
        for other in prompts[1:]:
            guidance = guidance + (self.teacher.predict_noise(latents_t, t, other)[0] - uncond)
        for negative in negative_prompts:
            guidance = guidance - (self.teacher.predict_noise(latents_t, t, negative)[0] - uncond)
        return uncond + self.config.guidance_scale * guidance

    def check_prompt(self, prompt: str) -> None:
        """Raise a ValueError when the teacher cannot be conditioned on ``prompt`` (see DiffusionTeacher)."""
        check = getattr(self.teacher, "check_prompt", None)
        if check is not None:
            check(prompt)

    def loss(self, domain_images: torch.Tensor, base_images: torch.Tensor, prompt: Union[str, Sequence[str]], rng: torch.Generator, negative_prompts: Sequence[str] = ()) -> torch.Tensor:
        """SDS (+ directional regularizer) surrogate for a batch of domain images and their base images.

        ``prompt``: one prompt, or several to compose; ``negative_prompts``: what to steer away from
        (see :meth:`guided_noise`). The directional regularizer guides the base image alike.
        """
        config, teacher = self.config, self.teacher
        latents = teacher.encode(domain_images)  # (B, C, h, w), differentiable
        if not torch.isfinite(latents).all():  # nan_to_num below cleans the teacher's output, not its input
            raise ValueError(
                f"score distillation: the teacher encoded the images to NaN or infinite latents (dtype {latents.dtype}; "
                f"images finite: {bool(torch.isfinite(domain_images).all())}). A float16 VAE can overflow: load the teacher in float32"
            )
        batch = latents.shape[0]
        T = teacher.num_train_timesteps
        t = torch.randint(int(config.t_min * T), max(int(config.t_max * T), int(config.t_min * T) + 1), (batch,), generator=rng)
        noise = torch.randn(latents.shape, generator=rng).to(latents)
        alpha_bar = teacher.alphas_cumprod.to(latents)[t].view(batch, 1, 1, 1)
        with torch.no_grad():
            noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
            eps_domain = self.guided_noise(noisy, t, prompt, negative_prompts)
            grad = (1 - alpha_bar) * (eps_domain - noise)  # w(t) = 1 - alpha_bar_t
            if config.lambda_directional > 0:
                base_latents = teacher.encode(base_images.detach())
                base_noisy = alpha_bar.sqrt() * base_latents + (1 - alpha_bar).sqrt() * noise
                eps_base = self.guided_noise(base_noisy, t, prompt, negative_prompts)
                radius = float(latents[0].numel()) ** 0.5  # expected norm of a standard Gaussian
                unit = lambda e: e / e.flatten(1).norm(dim=1).clamp_min(1e-8).view(batch, 1, 1, 1)  # noqa: E731
                grad = grad + config.lambda_directional * radius * (unit(eps_domain) - unit(eps_base))
            grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)  # a NaN from the teacher never reaches G
            if config.grad_clip is not None:
                grad = grad.clamp(-config.grad_clip, config.grad_clip)
        return sds_surrogate(latents, grad)
