"""StableDiffusionGuidance on a tiny random SD v1.x layout saved offline (nothing downloaded)."""

from __future__ import annotations

import shutil

import pytest
import torch

from expander.guidance.diffusion import StableDiffusionGuidance, training_schedule
from expander.losses.sds import ScoreDistillation, SdsConfig, sds_surrogate

from .conftest import TINY_SD_RESOLUTION as RESOLUTION, TINY_SD_TEXT_POSITIONS as TEXT_POSITIONS


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These models are tiny: a second intra-op thread only adds OpenMP sync, which on a shared,
    oversubscribed 2-core machine made each UNet call ~50x slower. Module scope, so building the
    models is covered too (conftest's per-test min(2, threads) keeps 1); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teacher(tiny_sd_dir) -> StableDiffusionGuidance:
    return StableDiffusionGuidance.from_pretrained(str(tiny_sd_dir), resolution=RESOLUTION)


def _images(batch: int = 2, size: int = RESOLUTION, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_from_pretrained_loads_frozen_components(teacher):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    assert isinstance(teacher.vae, AutoencoderKL) and isinstance(teacher.unet, UNet2DConditionModel)
    assert isinstance(teacher.text_encoder, CLIPTextModel) and isinstance(teacher.tokenizer, CLIPTokenizer)
    for module in (teacher.vae, teacher.unet, teacher.text_encoder):
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())
    assert teacher.num_train_timesteps == 1000 and teacher.prediction_type == "epsilon"
    assert torch.equal(teacher.alphas_cumprod, DDPMScheduler(num_train_timesteps=1000).alphas_cumprod)


def test_training_schedule_takes_the_betas_of_a_pndm_config():
    from diffusers import PNDMScheduler

    # SD v1.x ships this PNDM sampler config; the DDPM built from it must have the same training schedule.
    pndm = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)
    alphas_cumprod, steps, prediction_type = training_schedule(pndm.config)
    assert steps == 1000 and prediction_type == "epsilon"
    assert torch.equal(alphas_cumprod, pndm.alphas_cumprod.float())


def test_encode_is_deterministic_and_differentiable(teacher):
    images = _images().requires_grad_(True)
    latents = teacher.encode(images)
    assert latents.shape == (2, 4, 8, 8)
    assert torch.equal(latents, teacher.encode(images))  # posterior mean, no sampling
    latents.square().sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0

    # Other sizes are resized (differentiably) to the teacher's resolution.
    large = _images(size=2 * RESOLUTION).requires_grad_(True)
    latents = teacher.encode(large)
    assert latents.shape == (2, 4, 8, 8)
    latents.sum().backward()
    assert large.grad.shape == large.shape and large.grad.abs().sum() > 0


def test_predict_noise_shapes_and_conditioning(teacher):
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([10, 300, 900])
    with torch.no_grad():
        cond, uncond = teacher.predict_noise(latents, t, "a sketch")
        cond_other, uncond_other = teacher.predict_noise(latents, t, "a zombie")
    assert cond.shape == uncond.shape == latents.shape
    assert torch.isfinite(cond).all() and torch.isfinite(uncond).all()
    assert not torch.allclose(cond, uncond)  # the prompt changes the prediction
    assert not torch.allclose(cond, cond_other)
    assert torch.allclose(uncond, uncond_other, atol=1e-6)  # the empty prompt does not depend on the prompt
    # One embedding per prompt, computed once, with no graph attached.
    assert {"", "a sketch", "a zombie"} <= set(teacher._embeddings)
    assert teacher.text_embeddings("a sketch") is teacher.text_embeddings("a sketch")
    assert not teacher.text_embeddings("a sketch").requires_grad


def test_v_prediction_is_converted_to_epsilon(teacher):
    v_teacher = StableDiffusionGuidance(
        teacher.vae, teacher.unet, teacher.text_encoder, teacher.tokenizer,
        {"num_train_timesteps": 1000, "prediction_type": "v_prediction"}, resolution=RESOLUTION,
    )
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([50, 700])
    with torch.no_grad():
        raw_cond, raw_uncond = teacher.predict_noise(latents, t, "a sketch")  # same UNet: its raw output
        eps_cond, eps_uncond = v_teacher.predict_noise(latents, t, "a sketch")
    a = teacher.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(eps_cond, a.sqrt() * raw_cond + (1 - a).sqrt() * latents)
    torch.testing.assert_close(eps_uncond, a.sqrt() * raw_uncond + (1 - a).sqrt() * latents)

    with pytest.raises(ValueError, match="prediction_type"):
        StableDiffusionGuidance(teacher.vae, teacher.unet, teacher.text_encoder, teacher.tokenizer, {"prediction_type": "flow"})


@pytest.mark.parametrize("lambda_directional", [0.0, 1.0])
def test_sds_loss_gives_a_finite_scalar_and_image_gradient(teacher, lambda_directional):
    sds = ScoreDistillation(teacher, SdsConfig(lambda_directional=lambda_directional))
    domain = _images(seed=3).requires_grad_(True)
    base = _images(seed=4)
    loss = sds.loss(domain, base, "a sketch", torch.Generator().manual_seed(0))
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(domain.grad).all() and domain.grad.abs().sum() > 0


def test_sds_surrogate_gradient_is_grad_over_batch():
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    grad = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    sds_surrogate(x, grad).backward()
    # x - (x - grad) is grad up to one rounding of the subtraction.
    torch.testing.assert_close(x.grad, grad / 4, rtol=0, atol=1e-6)


def test_sds_surrogate_keeps_a_small_gradient_in_bfloat16():
    # mixed-precision latents: |x| ~ 4 and |grad| ~ 1e-3 would cancel in a bf16 subtraction
    x = (4 * torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))).bfloat16().requires_grad_(True)
    grad = 1e-3 * torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    sds_surrogate(x, grad.bfloat16()).backward()
    torch.testing.assert_close(x.grad.float(), grad.bfloat16().float() / 2, rtol=0.01, atol=1e-6)  # |grad / 2| ~ 5e-4


def test_nan_from_the_teacher_gives_a_zero_finite_gradient(teacher, monkeypatch):
    def nan_noise(latents_t, t, prompt):
        nan = torch.full_like(latents_t, float("nan"))
        return nan, nan

    monkeypatch.setattr(teacher, "predict_noise", nan_noise)
    sds = ScoreDistillation(teacher, SdsConfig(lambda_directional=1.0))
    domain = _images(seed=7).requires_grad_(True)
    loss = sds.loss(domain, _images(seed=8), "a sketch", torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(domain.grad).all() and torch.equal(domain.grad, torch.zeros_like(domain.grad))


def test_word_level_tokenizer_loads_through_auto_tokenizer(tiny_sd_dir, tiny_clip_dir, tmp_path):
    """A tokenizer.json-only tokenizer (conftest's word-level one) in the tokenizer subfolder works too."""
    root = tmp_path / "sd-word"
    shutil.copytree(tiny_sd_dir, root, ignore=shutil.ignore_patterns("tokenizer"))
    (root / "tokenizer").mkdir()
    for path in tiny_clip_dir.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(path, root / "tokenizer" / path.name)
    teacher = StableDiffusionGuidance.from_pretrained(str(root), resolution=RESOLUTION)
    with torch.no_grad():
        cond, uncond = teacher.predict_noise(torch.randn(2, 4, 8, 8), torch.tensor([100, 200]), "a sketch with glasses")
    assert cond.shape == (2, 4, 8, 8) and not torch.allclose(cond, uncond)
    assert teacher.text_embeddings("").shape == (1, TEXT_POSITIONS, 16)  # padded to the positions, not to 1e30


class _RecordingTeacher:
    """Noise predictions that are constants per prompt, so composed guidance can be checked exactly."""

    num_train_timesteps = 1000
    alphas_cumprod = torch.linspace(0.99, 0.01, 1000)

    def __init__(self):
        self.prompts = []

    def encode(self, images):
        return images

    def predict_noise(self, latents_t, t, prompt):
        self.prompts.append(prompt)
        value = {"a hat": 1.0, "blue skin": 10.0, "a crown": 3.0}[prompt]
        return torch.full_like(latents_t, value), torch.full_like(latents_t, 0.5)


def test_several_prompts_are_composed_in_the_guided_noise():
    teacher = _RecordingTeacher()
    sds = ScoreDistillation(teacher, SdsConfig(guidance_scale=2.0))
    latents, t = torch.zeros(2, 3, 4, 4), torch.tensor([10, 20])
    composed = sds.guided_noise(latents, t, ["a hat", "blue skin"])
    # uncond + scale * ((cond_hat - uncond) + (cond_blue - uncond))
    assert torch.allclose(composed, torch.full_like(latents, 0.5 + 2.0 * ((1.0 - 0.5) + (10.0 - 0.5))))
    assert torch.allclose(sds.guided_noise(latents, t, "a hat"), sds.guided_noise(latents, t, ["a hat"]))
    assert teacher.prompts == ["a hat", "blue skin", "a hat", "a hat"]
    with pytest.raises(ValueError, match="at least one prompt"):
        sds.guided_noise(latents, t, [])


def test_negative_prompts_are_negated_in_the_guided_noise():
    teacher = _RecordingTeacher()
    sds = ScoreDistillation(teacher, SdsConfig(guidance_scale=2.0))
    latents, t = torch.zeros(2, 3, 4, 4), torch.tensor([10, 20])
    steered = sds.guided_noise(latents, t, "a hat", ["a crown", "blue skin"])
    # uncond + scale * ((cond_hat - uncond) - (cond_crown - uncond) - (cond_blue - uncond))
    assert torch.allclose(steered, torch.full_like(latents, 0.5 + 2.0 * ((1.0 - 0.5) - (3.0 - 0.5) - (10.0 - 0.5))))
    assert teacher.prompts == ["a hat", "a crown", "blue skin"]
    assert torch.equal(sds.guided_noise(latents, t, "a hat", []), sds.guided_noise(latents, t, "a hat"))
    # The SDS loss takes them into the domain's and the directional regularizer's guided noise.
    teacher.prompts.clear()
    images = torch.zeros(2, 3, 4, 4, requires_grad=True)
    sds.loss(images, torch.zeros(2, 3, 4, 4), "a hat", torch.Generator().manual_seed(0), ["a crown"]).backward()
    assert teacher.prompts == ["a hat", "a crown"] * 2 and torch.isfinite(images.grad).all()


def test_sds_refuses_latents_that_are_not_finite(teacher, monkeypatch):
    sds = ScoreDistillation(teacher, SdsConfig())
    monkeypatch.setattr(teacher, "encode", lambda images: torch.full((len(images), 4, 4, 4), float("inf")))  # an overflowing float16 VAE
    with pytest.raises(ValueError, match="NaN or infinite latents .* load the teacher in float32"):
        sds.loss(_images(seed=3), _images(seed=4), "a sketch", torch.Generator().manual_seed(0))


@pytest.mark.parametrize("settings, message", [
    ({"t_min": 0.2, "t_max": 1.5}, "0 <= t_min < t_max <= 1"),
    ({"guidance_scale": -1.0}, "guidance_scale >= 0"),
    ({"grad_clip": 0.0}, "grad_clip must be > 0"),
])
def test_sds_config_is_checked(settings, message):
    with pytest.raises(ValueError, match=message):
        SdsConfig(**settings)


def test_the_sds_gradient_clamp_is_a_training_setting():
    from expander.train import ExpansionConfig

    assert ExpansionConfig().sds_config().grad_clip == 1.0
    assert ExpansionConfig(sds_grad_clip=None).sds_config().grad_clip is None  # off, as in DreamFusion
