"""The world's perceptual distance: LPIPS call signature and properties, strict loading, shipped sanity."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from expander.world import perceptual as P
from expander.world import renderer

SHIPPED = P.PERCEPTUAL_DIR / "model.safetensors"


@pytest.fixture
def random_net() -> P.WorldPerceptual:
    torch.manual_seed(0)
    return P.WorldPerceptual().eval().requires_grad_(False)


def test_lpips_signature_and_metric_properties(random_net):
    x = renderer.sample_portraits(3, 0).images
    y = renderer.sample_portraits(3, 1).images
    d = random_net(x, y)
    assert d.shape == (3, 1, 1, 1) and (d > 0).all()
    assert torch.equal(random_net(x, x), torch.zeros(3, 1, 1, 1))
    torch.testing.assert_close(random_net(y, x), d)
    torch.testing.assert_close(random_net((x + 1) / 2, (y + 1) / 2, normalize=True), d)
    assert random_net(x[:, :, ::4, ::4], y[:, :, ::4, ::4]).shape == (3, 1, 1, 1)  # other sizes are resized
    layers = random_net.layer_distances(x, y)
    assert len(layers) == 5
    torch.testing.assert_close(sum(layers), d)


def test_differentiable_in_both_inputs(random_net):
    x = renderer.sample_portraits(2, 0).images.requires_grad_(True)
    y = renderer.sample_portraits(2, 1).images.requires_grad_(True)
    random_net(x, y).sum().backward()
    assert x.grad is not None and y.grad is not None
    assert x.grad.abs().sum() > 0 and y.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in random_net.parameters())


def test_translate_moves_pixels():
    image = torch.zeros(1, 3, 8, 8)
    image[..., 3, 4] = 1
    shifted = P.translate(image, 1, 0)
    assert shifted[..., 3, 5].eq(1).all() and shifted.sum() == 3
    assert P.translate(image, 0, -2)[..., 1, 4].eq(1).all()


def test_training_kill_and_resume_then_strict_load(tmp_path, monkeypatch):
    kwargs = dict(steps=2, lin_steps=2, batch_size=4, lin_batch_size=4, progress=False, export_to=None, save_every=1, sanity_samples=4, scale_samples=8)
    straight = P.train_world_perceptual(tmp_path / "a", **kwargs)
    real_save = P.save_training_state

    def save_then_die(folder, modules, optimizers, generators, info):
        real_save(folder, modules, optimizers, generators, info)
        if info["step"] == 3:  # killed during phase 2
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(P, "save_training_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        P.train_world_perceptual(tmp_path / "b", **kwargs)
    monkeypatch.setattr(P, "save_training_state", real_save)
    resumed = P.train_world_perceptual(tmp_path / "b", **kwargs)
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert all((v >= 0).all() for k, v in a.items() if k.startswith("lins."))

    net = P.load_world_perceptual(resumed)
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    state = load_file(str(resumed / "model.safetensors"))
    del state["lins.0"]
    save_file(state, str(resumed / "model.safetensors"))
    with pytest.raises(ValueError, match="missing"):
        P.load_world_perceptual(resumed)


@pytest.mark.skipif(not SHIPPED.exists(), reason="shipped perceptual weights not built yet")
def test_shipped_distance_sanity():
    assert SHIPPED.stat().st_size <= 3 * 2**20
    net = P.load_world_perceptual()
    gen = torch.Generator().manual_seed(P.EVAL_SEED + 7)
    batch = renderer.sample_portraits(16, gen)
    x = batch.images
    other = renderer.sample_portraits(16, gen).images
    same = net(x, x)
    assert same.abs().max() == 0
    torch.testing.assert_close(net(x, other), net(other, x))
    shift = net(x, P.translate(x, 1, 0)).flatten()
    noise = net(x, (x + 0.02 * torch.randn(x.shape, generator=gen)).clamp(-1, 1)).flatten()
    different = net(x, other).flatten()
    assert (different > shift).all() and (different > noise).all()
    assert 0.2 < different.mean() < 1.0  # LPIPS-like scale (calibrated to 0.5 for unrelated portraits)
    for attribute in ("glasses", "sunglasses", "hat", "beard", "zombie", "blue_skin", "eyepatch", "sketch", "pop_art", "pixel_art"):
        labels = batch.labels.clone()
        labels[:, renderer.ATTRIBUTES.index(attribute)] = True
        added = net(x, renderer.render(batch.factors, renderer.resolve_conflicts(labels))).flatten()
        assert added.mean() > shift.mean(), attribute
        assert (added > shift).float().mean() >= 0.75, attribute
