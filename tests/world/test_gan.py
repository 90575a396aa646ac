"""The world GAN trainer runs, checkpoints and resumes exactly (tiny generator, stub renders)."""

import pytest
import torch

from expander.world import gan
from expander.world.parent import load_gan_export

from ..conftest import tiny_config


class StubBatch:
    def __init__(self, images):
        self.images = images


def stub_portraits(n, generator, with_captions=True):
    return StubBatch(torch.rand(n, 3, 16, 16, generator=generator) * 2 - 1)


def test_train_resume_and_export(tmp_path, monkeypatch):
    monkeypatch.setattr(gan.renderer, "sample_portraits", stub_portraits)
    config = lambda steps: gan.GanTrainingConfig(steps=steps, batch_size=4, checkpoint_every=2, r1_every=2, generator=tiny_config().to_dict())  # noqa: E731
    straight = gan.train_world_gan(tmp_path / "a", config(4), progress=False)
    gan.train_world_gan(tmp_path / "b", config(2), progress=False)
    resumed = gan.train_world_gan(tmp_path / "b", config(4), resume=True, progress=False)
    G_a, D_a = load_gan_export(straight)
    G_b, D_b = load_gan_export(resumed)
    for key, value in G_a.state_dict().items():
        assert torch.equal(value, G_b.state_dict()[key]), key
    assert torch.equal(G_a.w_avg, G_b.w_avg)
    assert G_a(torch.randn(2, 32)).shape == (2, 3, 16, 16)


def test_a_broken_export_says_to_rebuild(tmp_path):
    import json

    import pytest
    from safetensors.torch import save_file

    from expander.generators.stylegan2 import Discriminator, Generator

    config = tiny_config()
    G, D = Generator(config), Discriminator(config)
    (tmp_path / "config.json").write_text(json.dumps({"generator": config.to_dict()}))
    save_file({k: v.contiguous() for k, v in G.state_dict().items()}, str(tmp_path / "generator.safetensors"))  # no latent_avg
    save_file({k: v.contiguous() for k, v in D.state_dict().items()}, str(tmp_path / "discriminator.safetensors"))
    with pytest.raises(ValueError, match=r"lacks 'latent_avg'; rebuild it with `expander world build --what gan`"):
        load_gan_export(tmp_path)
    other = Generator(tiny_config(style_dim=16))  # another architecture
    save_file({**{k: v.contiguous() for k, v in other.state_dict().items()}, "latent_avg": torch.zeros(32)}, str(tmp_path / "generator.safetensors"))
    with pytest.raises(ValueError, match="does not match this expander's world GAN"):
        load_gan_export(tmp_path)


def _resonance(G, seed: int, n: int) -> torch.Tensor:
    """(n,) cosine of the first mapping layer's weight rows with the first n latents random_latents(n, seed) draws."""
    z = torch.randn(n, G.style_dim, generator=torch.Generator().manual_seed(seed))
    first = next(p for name, p in G.style.named_parameters() if p.dim() == 2)  # (style_dim, style_dim)
    return torch.nn.functional.cosine_similarity(first[:n], z, dim=1)


def test_the_weights_do_not_start_from_the_sampling_latents(tmp_path, monkeypatch):
    # torch.manual_seed(seed) before building the networks made the first mapping weight rows equal to
    # the z of random_latents(n, seed), and those samples left the generator's distribution.
    monkeypatch.setattr(gan.renderer, "sample_portraits", stub_portraits)
    config = gan.GanTrainingConfig(steps=1, batch_size=4, checkpoint_every=1, r1_every=2, generator=tiny_config().to_dict())
    G, _ = load_gan_export(gan.train_world_gan(tmp_path, config, progress=False))
    assert _resonance(G, config.seed, G.style_dim).abs().max() < 0.5


@pytest.mark.xfail(strict=True, reason=(
    "known defect of the shipped world GAN (built before weight_init_seed): its first mapping layer's rows are "
    "the first 128 latents of seed 0, which map to w about 1.7x the typical norm; fixed by rebuilding it "
    "(`expander world build --what gan`, then the parent), or without retraining by multiplying that layer's weight W by a "
    "fixed random orthogonal matrix R on its input side, W <- W R (PixelNorm commutes with R, so the new G at z is the old G at Rz: the same "
    "distribution, measured 6e-6 apart in w; seed 0's first 128 |w| 21.5 -> 12.3, other seeds 12.4-12.6); either "
    "changes which image every seed draws, so every world result"
))
def test_the_shipped_world_parent_samples_seed_0_like_any_other_seed():
    from expander.checkpoint import ExpandedGenerator
    from expander.world.parent import PARENT_DIR

    model = ExpandedGenerator.from_pretrained(PARENT_DIR)
    assert _resonance(model.generator, 0, 128).abs().max() < 0.5
    with torch.no_grad():
        seed_0, seed_1000 = (model.random_latents(256, seed).norm(dim=1)[:128].mean() for seed in (0, 1000))
    assert seed_0 < 1.2 * seed_1000
