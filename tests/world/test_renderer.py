import time

import pytest
import torch

from expander.world import renderer
from expander.world.renderer import ATTRIBUTE_PHRASES, ATTRIBUTES, SOURCE_FACTORS, render, sample_factors, sample_portraits, subject_factors


def test_deterministic_shapes_and_ranges():
    a, b = sample_portraits(8, 3), sample_portraits(8, 3)
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    assert not torch.equal(a.images, sample_portraits(8, 4).images)
    assert a.images.shape == (8, 3, 64, 64) and a.images.min() >= -1 and a.images.max() <= 1
    assert a.factors.shape == (8, len(SOURCE_FACTORS)) and a.labels.shape == (8, len(ATTRIBUTES))
    assert len(ATTRIBUTES) >= 16 and len(SOURCE_FACTORS) >= 10


def test_source_domain_has_no_attributes_and_is_diverse():
    batch = sample_portraits(64, 0)
    assert not batch.labels.any()
    assert batch.images.std(0).mean() > 0.15  # portraits differ from one another
    assert all(not any(p in c for a in ATTRIBUTES for p in ATTRIBUTE_PHRASES[a]) for c in batch.captions)


def _with_and_without(attribute: str, n: int = 16):
    factors = sample_factors(n, torch.Generator().manual_seed(1))
    labels = torch.zeros(n, len(ATTRIBUTES), dtype=torch.bool)
    plain = render(factors, labels)
    labels[:, ATTRIBUTES.index(attribute)] = True
    return plain, render(factors, labels), factors


def _face_mean(images: torch.Tensor) -> torch.Tensor:
    return images[:, :, 34:42, 22:42].mean(dim=(0, 2, 3))  # cheeks/mouth area, roughly centred


def test_skin_attributes_change_face_colour_the_expected_way():
    plain, zombie, _ = _with_and_without("zombie")
    delta = _face_mean(zombie) - _face_mean(plain)
    assert delta[1] > delta[0] and delta[1] > delta[2]  # greener
    plain, blue, _ = _with_and_without("blue_skin")
    delta = _face_mean(blue) - _face_mean(plain)
    assert delta[2] > 0.2 and delta[0] < 0


def test_sunglasses_darken_the_eyes_and_styles_hold():
    plain, shades, _ = _with_and_without("sunglasses")
    eyes = slice(24, 34)
    assert shades[:, :, eyes, 16:48].mean() < plain[:, :, eyes, 16:48].mean() - 0.2
    _, sketch, _ = _with_and_without("sketch")
    assert (sketch - sketch.mean(1, keepdim=True)).abs().max() < 1e-5  # greyscale
    _, pixel, _ = _with_and_without("pixel_art")
    blocks = pixel.unfold(2, 4, 4).unfold(3, 4, 4)  # constant on 4x4 blocks
    assert (blocks - blocks[..., :1, :1]).abs().max() < 1e-5


@pytest.mark.parametrize("attribute", ["hat", "crown", "cat_ears"])
def test_headwear_changes_pixels_above_the_head(attribute):
    plain, worn, _ = _with_and_without(attribute)
    assert (worn[:, :, :16] - plain[:, :, :16]).abs().mean() > 0.05


def test_every_attribute_is_visible_and_captioned():
    for attribute in ATTRIBUTES:
        plain, with_it, _ = _with_and_without(attribute, n=4)
        assert (with_it - plain).abs().amax(dim=(1, 2, 3)).min() > 0.3, attribute  # a clearly changed region in every image
        batch = sample_portraits(6, 2, attributes=[attribute])
        for text in batch.captions:
            assert any(p in text for p in ATTRIBUTE_PHRASES[attribute]), (attribute, text)


def test_conflicting_skin_attributes_keep_the_later_one():
    batch = sample_portraits(2, 0, attributes=["zombie", "blue_skin"])
    assert batch.labels[:, ATTRIBUTES.index("blue_skin")].all() and not batch.labels[:, ATTRIBUTES.index("zombie")].any()
    with pytest.raises(ValueError, match="unknown attributes"):
        sample_portraits(2, 0, attributes=["wings"])


def test_subject_keeps_identity_and_varies_pose():
    factors = subject_factors(10, torch.Generator().manual_seed(0))
    fixed = [SOURCE_FACTORS.index(n) for n in ("skin_tone", "hair_colour", "hair_style", "eye_colour", "face_width")]
    varying = [SOURCE_FACTORS.index(n) for n in ("head_x", "tilt")]
    assert factors[:, fixed].std(0).max() == 0 and factors[:, varying].std(0).min() > 0


def test_speed_smoke():
    torch.set_num_threads(1)  # thread oversubscription on a busy machine would measure the machine, not us
    renderer.sample_portraits(64, 0)  # warm-up
    start = time.perf_counter()
    sample_portraits(256, 1, attribute_prob=0.15)
    assert time.perf_counter() - start < 5.0  # ~0.15 s on an idle 2-core CPU; generous for loaded machines


def _extreme_factors(n: int, seed: int) -> torch.Tensor:
    """Random factors with every continuous factor pushed to 0 or 1 (the corners a window must cover)."""
    factors = sample_factors(n, torch.Generator().manual_seed(seed))
    continuous = [i for i, name in enumerate(SOURCE_FACTORS) if name not in renderer.CATEGORICAL]
    factors[:, continuous] = (torch.rand(n, len(continuous), generator=torch.Generator().manual_seed(seed + 1)) < 0.5).float()
    return factors


@pytest.mark.parametrize("resolution", [64, 48])
def test_windowed_layers_match_full_grid_rendering(monkeypatch, resolution):
    # Small features are drawn only inside a window of rows/columns; a box too small would clip them.
    factors = torch.cat([_extreme_factors(96, 10), sample_factors(32, torch.Generator().manual_seed(11))])
    labels = torch.rand(len(factors), len(ATTRIBUTES), generator=torch.Generator().manual_seed(12)) < 0.5
    windowed = render(factors, labels, resolution)
    monkeypatch.setattr(renderer, "USE_WINDOWS", False)
    assert torch.equal(windowed, render(factors, labels, resolution))


def test_other_resolutions():
    for resolution, block in ((32, 2), (128, 8)):
        batch = sample_portraits(4, 0, attributes=["pixel_art", "hat"], resolution=resolution)
        assert batch.images.shape == (4, 3, resolution, resolution) and batch.images.abs().max() <= 1
        blocks = batch.images.unfold(2, block, block).unfold(3, block, block)
        assert (blocks - blocks[..., :1, :1]).abs().max() < 1e-5


def test_source_skin_is_always_a_natural_tone():
    factors = _extreme_factors(64, 20)
    factors[:, SOURCE_FACTORS.index("skin_tone")] = torch.linspace(0, 1, 64)
    factors[:, SOURCE_FACTORS.index("hair_style")] = 0  # short hair: the cheeks are bare
    cheeks = (render(factors)[:, :, 36:40, 28:36].mean(dim=(2, 3)) + 1) / 2  # (N, 3)
    assert (cheeks[:, 0] > cheeks[:, 1]).all() and (cheeks[:, 1] > cheeks[:, 2]).all()  # red > green > blue: never green/blue


def test_glasses_under_sunglasses_resolve_to_sunglasses():
    both = torch.zeros(3, len(ATTRIBUTES), dtype=torch.bool)
    both[:, [ATTRIBUTES.index("glasses"), ATTRIBUTES.index("sunglasses")]] = True
    resolved = renderer.resolve_conflicts(both)
    assert resolved[:, ATTRIBUTES.index("sunglasses")].all() and not resolved[:, ATTRIBUTES.index("glasses")].any()
    factors = sample_factors(3, torch.Generator().manual_seed(0))
    assert torch.equal(render(factors, both), render(factors, resolved))
    batch = sample_portraits(3, 0, attributes=["glasses", "sunglasses", "eyepatch"])
    assert batch.labels[:, ATTRIBUTES.index("eyepatch")].all() and not batch.labels[:, ATTRIBUTES.index("glasses")].any()


def test_cat_ears_stay_visible_under_a_hat():
    factors = sample_factors(8, torch.Generator().manual_seed(2))
    hat = torch.zeros(8, len(ATTRIBUTES), dtype=torch.bool)
    hat[:, ATTRIBUTES.index("hat")] = True
    both = hat.clone()
    both[:, ATTRIBUTES.index("cat_ears")] = True
    difference = (render(factors, both) - render(factors, hat))[:, :, :20].abs()
    assert difference.amax(dim=(1, 2, 3)).min() > 0.5


def test_sketch_keeps_sunglasses_distinct_from_glasses():
    # Sketch lines alone would turn dark lenses into rings, i.e. glasses; the tone keeps them filled.
    factors = sample_factors(8, torch.Generator().manual_seed(3))
    sketches = {}
    for worn in ("glasses", "sunglasses"):
        labels = torch.zeros(8, len(ATTRIBUTES), dtype=torch.bool)
        labels[:, [ATTRIBUTES.index(worn), ATTRIBUTES.index("sketch")]] = True
        sketches[worn] = render(factors, labels)[:, :, 20:36, 16:48]  # the eye band
    differing = ((sketches["sunglasses"] - sketches["glasses"]).abs() > 0.3).float().mean(dim=(1, 2, 3))
    assert differing.min() > 0.1


def test_labels_of_the_wrong_shape_are_refused():
    one_row = torch.zeros(1, len(renderer.ATTRIBUTES), dtype=torch.bool)
    with pytest.raises(ValueError, match="one row of attribute flags per portrait"):
        renderer.sample_portraits(200, 0, attributes=one_row)  # used to give 128 portraits
    with pytest.raises(ValueError, match=r"labels must have shape \(3, "):
        renderer.render(renderer.sample_factors(3, 0), one_row)
