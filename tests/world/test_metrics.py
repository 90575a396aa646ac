"""World metrics on tiny inputs: Fréchet distance against closed forms, report structure and bookkeeping."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from expander.checkpoint import ExpandedGenerator
from expander.domains import Domain
from expander.world import metrics, renderer
from expander.world.renderer import ATTRIBUTES, CATEGORICAL, SOURCE_FACTORS

# ---- Fréchet distance ------------------------------------------------------------------------------


def test_frechet_identical_sets_is_zero():
    feats = torch.randn(200, 16, generator=torch.Generator().manual_seed(0))
    assert metrics.frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-8)
    assert metrics.frechet_distance(feats.numpy(), feats.clone()) == pytest.approx(0.0, abs=1e-8)


def test_frechet_closed_form_diagonal_and_rotated():
    # Diagonal covariances: FD = |mu_a - mu_b|^2 + sum (sqrt(a) - sqrt(b))^2.
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    mu_a, mu_b = np.zeros(3), np.array([1.0, -2.0, 0.5])
    expected = 1 + 4 + 0.25 + (1 - 3) ** 2 + (2 - 1) ** 2 + 0
    assert metrics.frechet_distance_from_stats(mu_a, np.diag(a), mu_b, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    # Identity vs a rotated covariance Q diag(l) Q^T: FD = sum (1 - sqrt(l))^2.
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(4, 4)))
    lam = np.array([4.0, 0.25, 1.0, 9.0])
    fd = metrics.frechet_distance_from_stats(np.zeros(4), np.eye(4), np.zeros(4), q @ np.diag(lam) @ q.T)
    assert fd == pytest.approx(np.square(1 - np.sqrt(lam)).sum(), rel=1e-9)


def test_frechet_from_samples_matches_closed_form():
    rng = np.random.default_rng(1)
    n = 20000
    x = rng.normal(size=(n, 3)) * np.array([1.0, 2.0, 0.5])
    y = rng.normal(size=(n, 3)) * np.array([3.0, 1.0, 0.5]) + np.array([1.0, 0.0, -1.0])
    expected = 1 + 0 + 1 + (1 - 3) ** 2 + (2 - 1) ** 2 + 0
    assert metrics.frechet_distance(x, y) == pytest.approx(expected, rel=0.05)


def test_frechet_rank_deficient_sets_are_finite_and_non_negative():
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randn(10, 64, generator=gen), torch.randn(12, 64, generator=gen) + 0.1  # n < d: singular covariances
    value = metrics.frechet_distance(a, b)
    assert np.isfinite(value) and value > 0
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    with pytest.raises(ValueError, match="same d"):
        metrics.frechet_distance(a, b[:, :8])


# ---- the report ------------------------------------------------------------------------------------


class StubClassifier:
    """Deterministic stand-in: attribute k is 'seen' when channel k % 3's mean brightness exceeds a threshold."""

    def __init__(self):
        self.seen_shapes = []

    def _check(self, images):
        self.seen_shapes.append(tuple(images.shape[-2:]))
        assert images.shape[-2:] == (64, 64), "metrics must resize images for the classifier"

    def predict_attributes(self, images):
        self._check(images)
        means = images.mean(dim=(2, 3))  # (N, 3)
        thresholds = torch.linspace(-0.05, 0.05, len(ATTRIBUTES))
        return torch.sigmoid(200 * (means[:, torch.arange(len(ATTRIBUTES)) % 3] - thresholds))

    def predict_factors(self, images):
        self._check(images)
        n = images.shape[0]
        factors = torch.sigmoid(F.adaptive_avg_pool2d(images, 4).flatten(1)[:, : len(SOURCE_FACTORS)] * 3)
        for name in CATEGORICAL:
            factors[:, SOURCE_FACTORS.index(name)] = (images[:, 0].mean(dim=(1, 2)) > 0).float()
        return factors.reshape(n, -1)

    def features(self, images):
        self._check(images)
        return F.adaptive_avg_pool2d(images, 4).flatten(1)


def pixel_distance(a, b):
    return (a - b).abs().mean(dim=(1, 2, 3), keepdim=True)


@pytest.fixture
def world_like(tiny_generator) -> ExpandedGenerator:
    model = ExpandedGenerator.from_generator(tiny_generator, alpha=3.0, num_dormant=8, base_model="expander/world-test")
    for name in ("glasses", "zombie", "ghoul", "blue_skin", "mystery"):
        model.add_domain(Domain(name, direction=-1))
    return model


def _report(model, **kwargs):
    stub = StubClassifier()
    kwargs.setdefault("attribute_of", {"ghoul": "zombie"})
    report = metrics.evaluate(model, n_samples=12, seed=3, batch_size=5, progress=False, classifier=stub, perceptual=pixel_distance, **kwargs)
    return report, stub


def test_report_schema_and_json(world_like):
    report, stub = _report(world_like)
    assert tuple(report) == metrics.REPORT_KEYS
    json.loads(json.dumps(report))  # JSON-serialisable as is
    assert set(stub.seen_shapes) == {(64, 64)}  # 16x16 samples were resized
    assert report["attribute_of"] == {"glasses": "glasses", "zombie": "zombie", "ghoul": "zombie", "blue_skin": "blue_skin", "mystery": None}
    assert report["unmapped_domains"] == ["mystery"]
    mapped = ["glasses", "zombie", "ghoul", "blue_skin"]
    assert report["leakage"]["rows"] == ["base", *mapped] and report["leakage"]["columns"] == mapped
    assert set(report["domain_success"]) == set(report["reference_success"]) == set(mapped)
    assert set(report["alignment"]) == set(world_like.domain_names)  # unmapped domains still get alignment
    assert report["alignment"]["mystery"]["reference_factors_preserved"] is None
    assert len(report["composition"]) == 5  # every pair of the 4 mapped domains but zombie+ghoul (one attribute)
    assert "zombie+ghoul" not in report["composition"]
    assert report["composition"]["zombie+blue_skin"]["conflicting"] is True
    assert report["composition"]["glasses+zombie"]["conflicting"] is False
    for key in ("fid", "fid_floor"):
        assert report["source_preservation"][key] >= 0
    assert report["source_preservation"]["parent_fid"] is None
    assert set(report["summary"]) == {"mean_success", "mean_leakage", "mean_base_false_positive", "mean_perceptual", "mean_factors_preserved", "mean_composition", "reference_mean_composition", "mean_diversity", "reference_mean_success"}


def test_success_and_leakage_match_direct_computation(world_like):
    report, _ = _report(world_like, pairs=[("glasses", "ghoul")])
    stub = StubClassifier()

    def labelled(images):
        return stub.predict_attributes(F.interpolate(images, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)) > 0.5

    matrix = report["leakage"]["matrix"]
    for row in ["base", "glasses", "zombie", "ghoul", "blue_skin"]:
        seen = labelled(world_like.sample(row, n=12, seed=3)).float().mean(0)
        for col, attribute in [("glasses", "glasses"), ("zombie", "zombie"), ("ghoul", "zombie"), ("blue_skin", "blue_skin")]:
            assert matrix[row][col] == pytest.approx(seen[ATTRIBUTES.index(attribute)].item(), abs=1e-4), (row, col)
            assert report["attribute_rates"][row][attribute] == pytest.approx(seen[ATTRIBUTES.index(attribute)].item(), abs=1e-4)
        if row != "base":
            assert report["domain_success"][row] == matrix[row][row]
    both = labelled(world_like.sample("glasses", n=12, seed=3, compose=["ghoul"]))
    expected = (both[:, ATTRIBUTES.index("glasses")] & both[:, ATTRIBUTES.index("zombie")]).float().mean().item()
    assert list(report["composition"]) == ["glasses+ghoul"]
    assert report["composition"]["glasses+ghoul"]["both"] == pytest.approx(expected, abs=1e-4)
    # the ceiling: the same count on renders drawn with both attributes
    factors = renderer.sample_factors(12, 3 + metrics._RENDER_SEED_OFFSET + 3)
    drawn = labelled(renderer.render(factors, renderer.attribute_labels(12, "glasses") | renderer.attribute_labels(12, "zombie")))
    ceiling = (drawn[:, ATTRIBUTES.index("glasses")] & drawn[:, ATTRIBUTES.index("zombie")]).float().mean().item()
    assert report["composition"]["glasses+ghoul"]["reference_both"] == pytest.approx(ceiling, abs=1e-4)
    assert report["summary"]["reference_mean_composition"] == pytest.approx(ceiling, abs=1e-4)
    # a domain's ceiling: the same count on renders drawn with its attribute alone
    for name, attribute in [("glasses", "glasses"), ("ghoul", "zombie")]:
        drawn = labelled(renderer.render(factors, renderer.attribute_labels(12, attribute)))
        assert report["reference_success"][name] == pytest.approx(drawn[:, ATTRIBUTES.index(attribute)].float().mean().item(), abs=1e-4)


def test_composition_ceiling_with_the_world_classifier():
    """Renders with both attributes are read as both, except where the renderer cannot draw both."""
    from expander.world.classifier import load_world_classifier

    classifier = load_world_classifier()
    assert metrics._reference_rate(classifier, ("glasses", "hat"), 64, seed=0) > 0.9
    assert metrics._reference_rate(classifier, ("zombie", "blue_skin"), 64, seed=0) == 0  # blue skin wins (renderer.CONFLICTS)
    # Alone, an attribute is read more often than the classifier's recall on renders mixing attributes
    # says (freckles 0.875, zombie 0.883 there), which is the ceiling that matters for a domain's success.
    assert metrics._reference_rate(classifier, ("freckles",), 256, seed=0) > 0.93
    assert metrics._reference_rate(classifier, ("zombie",), 256, seed=0) > 0.95


def test_alignment_numbers(world_like):
    report, _ = _report(world_like)
    w = world_like.random_latents(12, 3)
    base = world_like.generator.synthesis(world_like.domain_latents(w, {}), noise_mode="const").clamp(-1, 1)
    glasses = world_like.generator.synthesis(world_like.domain_latents(w, {"glasses": 1.0}), noise_mode="const").clamp(-1, 1)
    assert report["alignment"]["glasses"]["perceptual"] == pytest.approx(pixel_distance(base, glasses).mean().item(), rel=1e-4)
    # diversity: how much consecutive samples differ, relative to the base samples
    spread = lambda images: pixel_distance(images[:-1], images[1:]).mean().item()  # noqa: E731
    assert report["alignment"]["glasses"]["diversity"] == pytest.approx(spread(glasses) / spread(base), rel=1e-3)
    for entry in report["alignment"].values():
        assert 0 <= entry["factors_preserved"] <= 1
        assert set(entry["per_factor"]) == set(SOURCE_FACTORS)


def test_parent_fid_and_bad_arguments(world_like, tiny_generator):
    parent = ExpandedGenerator.from_generator(tiny_generator, base_model="expander/world-test")
    report, _ = _report(world_like, parent=parent, pairs=[])
    # The parent has no repurposed directions; its samples differ from the expanded model's base ones.
    assert report["source_preservation"]["parent_fid"] >= 0 and report["composition"] == {}
    with pytest.raises(ValueError, match="unknown attributes"):
        _report(world_like, attribute_of={"ghoul": "werewolf"})
    with pytest.raises(ValueError, match="does not have"):
        _report(world_like, attribute_of={"nobody": "zombie"})
    with pytest.raises(ValueError, match="known attribute"):
        _report(world_like, pairs=[("glasses", "mystery")])


def test_evaluation_grid_has_one_row_per_domain(world_like, tmp_path):
    path = metrics.evaluation_grid(world_like, tmp_path / "grid.png", n=3, seed=0)
    with Image.open(path) as image:
        width, height = image.size
    rows = 1 + len(world_like.domain_names)
    # save_grid: 2 px padding, 16 px images upscaled x8.
    assert (width, height) == ((3 * 18 + 2) * 8, (rows * 18 + 2) * 8)


def test_factors_preserved_uses_the_reliable_factors(world_like):
    stub = StubClassifier()
    stub.reliable_factors = ["hair_colour", "head_x"]
    report = metrics.evaluate(world_like, n_samples=6, seed=0, pairs=[], progress=False, classifier=stub, perceptual=pixel_distance)
    assert report["reliable_factors"] == ["hair_colour", "head_x"]
    for entry in report["alignment"].values():
        expected = (entry["per_factor"]["hair_colour"] + entry["per_factor"]["head_x"]) / 2
        assert entry["factors_preserved"] == pytest.approx(expected, abs=1e-3)


def test_format_report_summarises_every_domain(world_like):
    report, _ = _report(world_like)
    report["classifier"] = {"n": 10, "attribute_accuracy": {"glasses": 0.97, "hat": 0.99}}
    text = metrics.format_report(report)
    for name in world_like.domain_names:
        assert name in text
    assert f"FD to renders {report['source_preservation']['fid']:.2f}" in text
    assert "min accuracy 0.970 (glasses)" in text


def test_format_report_shows_a_dash_where_nothing_was_measured(world_like):
    report, _ = _report(world_like)
    report["alignment"]["glasses"]["factors_preserved"] = None  # a classifier with no reliable factors
    (line,) = [row for row in metrics.format_report(report).splitlines() if row.startswith("glasses ")]
    assert line.split()[5] == "-", line
    assert line.split()[2] == f"{report['reference_success']['glasses']:.3f}", line  # "of renders": the ceiling
    del report["reference_success"]  # a report of an older expander
    (line,) = [row for row in metrics.format_report(report).splitlines() if row.startswith("glasses ")]
    assert line.split()[2] == "-", line


def test_attributes_are_named_as_loosely_as_domains():
    assert metrics.resolve_attributes(["specs", "blue-skin"], {"specs": "Blue-Skin"}) == {"specs": "blue_skin", "blue-skin": "blue_skin"}


def test_subject_match_reports_domain_base_and_ceiling(world_like):
    from expander.world.renderer import render, subject_factors

    photos = render(subject_factors(4, torch.Generator().manual_seed(3)))
    result = metrics.subject_match(world_like, "glasses", photos, n_samples=6, seed=0, classifier=StubClassifier())
    assert set(result) == {"domain", "identity_factors", "anchored", "domain_match", "base_same_latents_match", "base_match", "subject_photos_match"}
    assert result["anchored"] is False
    assert not set(result["identity_factors"]) & set(metrics.POSE_FACTORS)
    for key in ("domain_match", "base_same_latents_match", "base_match", "subject_photos_match"):
        assert 0.0 <= result[key] <= 1.0


def test_world_subject_domains_get_an_identity_report(world_like):
    world_like.add_domain(Domain("subject3", direction=-1, method="mystyle", images="world:subject:3"))
    world_like.set_anchors("subject3", world_like.random_latents(4, seed=9))
    report, _ = _report(world_like)
    assert list(report["subjects"]) == ["subject3"]  # only mystyle domains of a world subject
    subject = report["subjects"]["subject3"]
    assert subject["anchored"] is True and 0.0 <= subject["domain_match"] <= 1.0
    text = metrics.format_report(report)
    assert "subject3: identity match" in text
    assert "nan" not in text  # a domain without an attribute shows '-' as its success


def test_world_subject_source_is_validated():
    from expander.world import renderer

    assert renderer.world_subject_seed("world:subject:7") == 7 and renderer.world_subject_seed("photos/me") is None
    with pytest.raises(ValueError, match="integer SEED"):
        renderer.world_subject_seed("world:subject:seven")


def test_default_evaluation_latents_are_held_out_from_default_training():
    import inspect

    from expander.cli import evaluate as eval_command
    from expander.domains import EVAL_SEED
    from expander.train import ExpansionConfig

    # Training draws z with torch.randn(n, D, generator=Generator().manual_seed(config.seed)), as
    # random_latents does: at equal seeds a default eval would score the latents training began with.
    assert inspect.signature(metrics.evaluate).parameters["seed"].default == EVAL_SEED
    assert inspect.signature(metrics.evaluation_grid).parameters["seed"].default == EVAL_SEED
    assert next(p for p in eval_command.params if p.name == "seed").default == EVAL_SEED
    training_seed = ExpansionConfig().seed
    assert training_seed != EVAL_SEED
    first = lambda seed: torch.randn(256, 8, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.cdist(first(training_seed), first(EVAL_SEED)).min() > 0.5
