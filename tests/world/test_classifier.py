"""The world's evaluation classifier: factor codec, shapes, strict loading, resumable training, shipped accuracy."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from expander.world import classifier as C
from expander.world import renderer
from expander.world.renderer import ATTRIBUTES, CATEGORICAL, SOURCE_FACTORS

SHIPPED = C.CLASSIFIER_DIR / "model.safetensors"


def _perfect_outputs(factors: torch.Tensor) -> torch.Tensor:
    """Factor-head outputs that encode ``factors`` exactly (inverse of the codec's decoding)."""
    codec = C.CODEC
    cont = factors[:, codec.continuous].clamp(1e-4, 1 - 1e-4)
    parts = [torch.log(cont / (1 - cont))]
    angle = factors[:, codec.circular] * 2 * math.pi
    parts.append(torch.stack([torch.cos(angle), torch.sin(angle)], -1).flatten(1))
    for index, count in codec.categorical:
        parts.append(10 * torch.nn.functional.one_hot(factors[:, index].long(), count).float())
    return torch.cat(parts, 1)


def test_factor_codec_round_trip_and_errors():
    factors = renderer.sample_factors(64, 0)
    out = _perfect_outputs(factors)
    assert out.shape == (64, C.CODEC.size)
    decoded = C.CODEC.decode(out)
    errors = C.factor_errors(decoded, factors)
    assert errors.max().item() < 1e-3
    assert C.CODEC.loss(out, factors).item() < 0.01
    # Hues are circular: 0.99 and 0.01 are 0.02 apart.
    assert C.circular_distance(torch.tensor([0.99]), torch.tensor([0.01])).item() == pytest.approx(0.02, abs=1e-6)


def test_random_classifier_shapes_and_resizing():
    model = C.WorldClassifier().eval()
    small = torch.rand(3, 3, 16, 16) * 2 - 1
    probs = model.predict_attributes(small)
    assert probs.shape == (3, len(ATTRIBUTES)) and probs.min() >= 0 and probs.max() <= 1
    factors = model.predict_factors(small)
    assert factors.shape == (3, len(SOURCE_FACTORS))
    for name, count in CATEGORICAL.items():
        column = factors[:, SOURCE_FACTORS.index(name)]
        assert torch.equal(column, column.round()) and column.max() < count
    assert model.features(small).shape == (3, model.feature_dim)
    together = model.predict(small)
    torch.testing.assert_close(together["attributes"], probs)
    assert not together["features"].requires_grad
    assert sum(p.numel() for p in model.parameters()) < 700_000  # <= 3 MB in float32


def test_save_load_is_strict_and_frozen(tmp_path):
    torch.manual_seed(0)
    model = C.WorldClassifier().eval()
    folder = C.save_classifier(model, tmp_path / "clf", metrics={"x": 1})
    loaded = C.load_world_classifier(folder)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    images = renderer.sample_portraits(4, 0, attribute_prob=0.3).images
    torch.testing.assert_close(loaded.predict_attributes(images), model.predict_attributes(images))
    state = load_file(str(folder / "model.safetensors"))
    state["extra.weight"] = torch.zeros(1)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match="unexpected"):
        C.load_world_classifier(folder)
    config = json.loads((folder / "config.json").read_text())
    config["format"] = "something else"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not a world classifier"):
        C.load_world_classifier(folder)


def test_training_resumes_bit_for_bit(tmp_path, monkeypatch):
    kwargs = dict(steps=3, batch_size=4, progress=False, export_to=None, eval_samples=8, save_every=1)
    straight = C.train_world_classifier(tmp_path / "a", **kwargs)

    real_save = C.save_training_state

    def save_then_die(folder, modules, optimizers, generators, info):
        real_save(folder, modules, optimizers, generators, info)
        if info["step"] == 2:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(C, "save_training_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        C.train_world_classifier(tmp_path / "b", **kwargs)
    monkeypatch.setattr(C, "save_training_state", real_save)
    state = (tmp_path / "b" / "state" / "state.safetensors").read_bytes()
    with pytest.raises(ValueError, match=r"other settings \(batch_size: 4 in the state, 8 now\).*--no-resume"):
        C.train_world_classifier(tmp_path / "b", **{**kwargs, "batch_size": 8})  # another run's state: refused, left as it was
    assert (tmp_path / "b" / "state" / "state.safetensors").read_bytes() == state
    resumed = C.train_world_classifier(tmp_path / "b", **kwargs)
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert sorted(p.name for p in resumed.iterdir()) == ["config.json", "model.safetensors"]  # no training state


@pytest.mark.skipif(not SHIPPED.exists(), reason="shipped classifier weights not built yet")
def test_shipped_classifier_is_accurate_on_held_out_renders():
    assert SHIPPED.stat().st_size <= 3 * 2**20
    model = C.load_world_classifier()
    metrics = C.evaluate_world_classifier(model, n=300, seed=C.EVAL_SEED + 1)
    accuracy = metrics["attribute_accuracy"]
    assert min(accuracy.values()) >= 0.9, accuracy
    assert metrics["mean_attribute_accuracy"] >= 0.95, accuracy
    assert min(metrics["source_factor_accuracy"].values()) >= 0.8, metrics["source_factor_accuracy"]
    # Every attribute alone is recognised on most renders.
    for attribute in ATTRIBUTES:
        images = renderer.sample_portraits(16, 5, attributes=[attribute]).images
        assert (model.predict_attributes(images)[:, ATTRIBUTES.index(attribute)] > 0.5).float().mean() >= 0.75, attribute


def test_reliable_factors_from_metrics():
    assert C.reliable_factors({}) == list(SOURCE_FACTORS)
    metrics = {
        "source_factor_accuracy": {"hair_colour": 0.99, "hair_style": 0.5, "eye_colour": 0.95},
        "source_factor_mae": {f: (0.3 if f == "brow_angle" else 0.02) for f in SOURCE_FACTORS if f not in CATEGORICAL},
    }
    reliable = C.reliable_factors(metrics)
    assert "hair_style" not in reliable and "brow_angle" not in reliable
    assert len(reliable) == len(SOURCE_FACTORS) - 2
