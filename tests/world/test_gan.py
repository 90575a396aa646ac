"""The world GAN trainer runs, checkpoints and resumes exactly (tiny generator, stub renders)."""

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
