"""Stable Diffusion (diffusers) as the :class:`~expander.losses.sds.DiffusionTeacher` for SDS.

The teacher works in the VAE's latent space, as in StyleGAN-Fusion and DreamFusion-style SDS: the
generator's [-1, 1] images are resized to the teacher's resolution and encoded by the VAE (the
posterior *mean*, so encoding is deterministic and differentiable), and the UNet predicts the noise
of noisy latents with and without the prompt in one batched call.

Components are loaded one by one from the usual v1.x pipeline layout (``vae``, ``unet``,
``text_encoder``, ``tokenizer``, ``scheduler`` subfolders) rather than through a pipeline: SDS needs
no safety checker, feature extractor or sampler, and loading them would cost memory and downloads.
The noise schedule is the one the UNet was trained with, i.e. the DDPM betas from the scheduler
config (SD ships a PNDM scheduler for sampling, but with the training betas).

Users who already hold the components (e.g. from a loaded pipeline) can build the teacher directly::

    StableDiffusionGuidance(pipe.vae, pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler.config)
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F

# Scheduler-config keys that define the training noise schedule; the sampler-specific rest
# (PNDM's ``skip_prk_steps``, ``set_alpha_to_one``, ...) is dropped so DDPMScheduler does not warn.
_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "rescale_betas_zero_snr")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def training_schedule(scheduler_config: Mapping[str, Any]) -> tuple[torch.Tensor, int, str]:
    """(alphas_cumprod (T,), T, prediction_type) of the schedule a scheduler config was trained with."""
    from diffusers import DDPMScheduler

    ddpm = DDPMScheduler(**{key: scheduler_config[key] for key in _SCHEDULE_KEYS if key in scheduler_config})
    prediction_type = scheduler_config.get("prediction_type", "epsilon")
    return ddpm.alphas_cumprod.float().clone(), int(ddpm.config.num_train_timesteps), prediction_type


class StableDiffusionGuidance:
    """A frozen Stable Diffusion teacher: ``encode`` images to latents, ``predict_noise`` (cond, uncond).

    ``resolution``: the side the generator's images are resized to before encoding (512 for SD v1.x,
    whose VAE downsamples by 8 to 64x64 latents).
    """

    def __init__(self, vae, unet, text_encoder, tokenizer, scheduler_config: Mapping[str, Any], resolution: int = 512):
        self.vae = vae.eval().requires_grad_(False)
        self.unet = unet.eval().requires_grad_(False)
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.resolution = int(resolution)
        self.alphas_cumprod, self.num_train_timesteps, self.prediction_type = training_schedule(scheduler_config)
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unsupported scheduler prediction_type {self.prediction_type!r}; expected one of {PREDICTION_TYPES}")
        # Mismatched components fail deep inside the UNet with an opaque shape error; say it here.
        if unet.config.in_channels != vae.config.latent_channels:
            raise ValueError(f"unet.in_channels={unet.config.in_channels} but the VAE has {vae.config.latent_channels} latent channels")
        cross_dim = unet.config.cross_attention_dim  # an int for SD; per-block tuples are left to the UNet
        if isinstance(cross_dim, int) and cross_dim != text_encoder.config.hidden_size:
            raise ValueError(f"unet.cross_attention_dim={cross_dim} but the text encoder's hidden size is {text_encoder.config.hidden_size}")
        self._embeddings: dict[str, torch.Tensor] = {}  # prompt -> (1, L, D) last hidden states, no grad

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        resolution: int = 512,
        variant: Optional[str] = None,
    ) -> "StableDiffusionGuidance":
        """Load the components of a diffusers SD v1.x repo or folder (Hub id: downloads here, and only here).

        ``variant``: a weights variant of the repo (e.g. ``"fp16"``) to download less with ``dtype=torch.float16``.
        """
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel

        path = str(name_or_path)
        # The dtype is given at load time, not by a later .to(dtype): diffusers 0.42 warns on the latter
        # (and would otherwise not keep a model's float32-only modules in float32).
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", variant=variant, torch_dtype=dtype)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", variant=variant, torch_dtype=dtype)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", variant=variant, dtype=dtype)  # transformers 5: dtype=
        # AutoTokenizer reads tokenizer_config.json: SD's CLIPTokenizer (vocab.json + merges.txt) and
        # tokenizer.json-only tokenizers both load.
        tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
        scheduler_config = DDPMScheduler.load_config(path, subfolder="scheduler")
        modules = [m.to(device) for m in (vae, unet, text_encoder)]
        return cls(*modules, tokenizer, scheduler_config, resolution=resolution)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images (B, 3, H, W) -> scaled VAE latents (B, C, h, w), differentiable w.r.t. images.

        The latents come back on the images' device and dtype, so the SDS arithmetic stays in the
        generator's precision even when the teacher runs in half precision.
        """
        x = images
        size = (self.resolution, self.resolution)
        if tuple(x.shape[-2:]) != size:
            downsampling = x.shape[-2] > size[0] or x.shape[-1] > size[1]
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=downsampling)
        x = x.to(device=self.device, dtype=self.vae.dtype)
        # The posterior mean, not a sample: the SDS noise is the only randomness, drawn from the caller's rng.
        latents = self.vae.encode(x).latent_dist.mean  # (B, C, res/f, res/f)
        shift = getattr(self.vae.config, "shift_factor", None)  # None for SD v1.x/2.x VAEs
        if shift is not None:
            latents = latents - shift
        latents = latents * self.vae.config.scaling_factor
        return latents.to(device=images.device, dtype=images.dtype)

    @torch.no_grad()
    def text_embeddings(self, prompt: str) -> torch.Tensor:
        """The text encoder's last hidden states for ``prompt`` (1, L, D), computed once per prompt."""
        if prompt not in self._embeddings:
            # Word-level tokenizers may leave model_max_length unset (a huge sentinel): cap at the positions.
            max_length = min(self.tokenizer.model_max_length, self.text_encoder.config.max_position_embeddings)
            tokens = self.tokenizer(prompt, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
            # SD v1.x attends over the padding too (as the diffusers pipeline does unless the config asks for a mask).
            mask = tokens.attention_mask.to(self.device) if getattr(self.text_encoder.config, "use_attention_mask", False) else None
            output = self.text_encoder(tokens.input_ids.to(self.device), attention_mask=mask)
            self._embeddings[prompt] = output.last_hidden_state.to(self.dtype)
        return self._embeddings[prompt]

    def predict_noise(self, latents_t: torch.Tensor, t: torch.Tensor, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise predictions (conditional on ``prompt``, unconditional) for noisy latents (B, C, h, w) at steps t (B,).

        One UNet call on the doubled batch [cond; uncond]. Grad mode is the caller's
        (:class:`~expander.losses.sds.ScoreDistillation` calls this under ``no_grad``).
        """
        batch = latents_t.shape[0]
        t = torch.as_tensor(t, device=self.device).reshape(-1).expand(batch)  # (B,), also from a scalar
        cond = self.text_embeddings(prompt).expand(batch, -1, -1)  # (B, L, D)
        uncond = self.text_embeddings("").expand(batch, -1, -1)
        sample = torch.cat([latents_t, latents_t]).to(device=self.device, dtype=self.dtype)  # (2B, C, h, w)
        timesteps = torch.cat([t, t])  # (2B,)
        output = self.unet(sample, timesteps, encoder_hidden_states=torch.cat([cond, uncond])).sample  # (2B, C, h, w)
        eps = self._as_epsilon(output.float(), sample.float(), timesteps)  # float32 for the conversion
        eps = eps.to(device=latents_t.device, dtype=latents_t.dtype)
        return eps[:batch], eps[batch:]

    def _as_epsilon(self, output: torch.Tensor, sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Convert the UNet's output to a noise prediction, with x_t = sqrt(a) x_0 + sqrt(1 - a) eps."""
        if self.prediction_type == "epsilon":
            return output
        a = self.alphas_cumprod.to(output.device)[t].view(-1, 1, 1, 1)
        if self.prediction_type == "v_prediction":  # v = sqrt(a) eps - sqrt(1 - a) x_0  =>  eps = sqrt(a) v + sqrt(1 - a) x_t
            return a.sqrt() * output + (1 - a).sqrt() * sample
        # "sample": the UNet predicts x_0 directly.
        return (sample - a.sqrt() * output) / (1 - a).sqrt()
