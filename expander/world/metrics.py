"""Exact measurements of an expanded generator of the portraits world.

Everything is measured with the world's frozen *evaluation* classifier
(:mod:`expander.world.classifier`, never a training signal) and, for alignment, the world's
perceptual distance (:mod:`expander.world.perceptual`). Every domain is sampled from the *same*
latents ``w = model.random_latents(n_samples, seed)``: the base image of a sample is
``synthesis(domain_latents(w, {}))`` and its domain-``d`` image ``synthesis(domain_latents(w, {d: 1}))``,
so each domain image has a base counterpart of the same identity. Images are resized to 64x64
before the classifier when the generator makes another size.

A domain's attribute is its name when that is one of :data:`~expander.world.renderer.ATTRIBUTES`,
else ``attribute_of[name]``; a domain with neither is *unmapped*: it still gets alignment numbers
but no success / leakage / composition. "Labelled with an attribute" means classifier probability
> 0.5.

Report of :func:`evaluate` (a JSON-serialisable dict)::

    format               "expander.world.metrics"; version: 1
    n_samples, seed      what was sampled
    domains              [domain names, in the model's order]
    attribute_of         {domain: attribute or null}
    unmapped_domains     [domains without an attribute]
    source_preservation  {"fid": FD(classifier features of base samples, source renders),
                          "fid_floor": FD of two independent render sets of the same size (the
                          finite-sample bias: a perfect generator scores about this),
                          "parent_fid": the parent's base samples against the same renders, or null}
    domain_success       {domain: fraction of its samples labelled with its attribute} (mapped domains)
    reference_success    {domain: the same fraction on renders drawn with its attribute alone (what a
                          perfect domain scores: the classifier's ceiling for that domain's success,
                          higher than its recall on renders mixing attributes, where others hide it;
                          at most 256 renders, however many samples)} (mapped domains)
    leakage              {"rows": ["base", *mapped], "columns": [*mapped],
                          "matrix": {row: {column: fraction of row's samples labelled with column's
                          attribute}}}; the diagonal is domain_success, the base row the false
                          positives on source samples
    attribute_rates      {"base" or domain: {attribute: fraction labelled}} for all 17 attributes
    alignment            {domain: {"perceptual": mean world-perceptual distance base vs domain image,
                          "factors_preserved": mean over samples and reliable factors of "predicted
                          factor unchanged" (categorical equal; continuous within factor_tolerance,
                          hues on the circle), "per_factor": {factor: fraction} (all factors),
                          "reference_factors_preserved": the same measured on renders with and
                          without the attribute (what a perfectly aligned domain scores; some
                          attributes hide factors, e.g. sunglasses hide eye colour; at most 256
                          renders, however many samples), or null,
                          "diversity": world-perceptual distance between the domain's samples of
                          consecutive latents, over the same for the base samples (1 = as varied
                          as the source domain; near 0 = one template whatever the latent)}}
    composition          {"i+j": {"domains": [i, j], "attributes": [a_i, a_j], "both": fraction of
                          samples of w + a_i + a_j labelled with both, "first"/"second": with each,
                          "conflicting": true when the renderer cannot show both (renderer.CONFLICTS),
                          "reference_both": the same fraction on renders drawn with both attributes
                          (what a perfect pair of domains scores: the classifier's ceiling; at
                          most 256 renders, however many samples)}}
    summary              {"mean_success", "mean_leakage" (off-diagonal, domain rows, without
                          the cells of two domains that draw the same attribute),
                          "mean_base_false_positive", "mean_perceptual", "mean_factors_preserved",
                          "mean_composition", "mean_diversity", and the ceilings "reference_mean_success"
                          and "reference_mean_composition"} (null when there is nothing to average)
    factor_tolerance     tolerance used for continuous factors
    reliable_factors     the factors the classifier reads back well (classifier.reliable_factors;
                         all factors for a classifier without that attribute), used by
                         factors_preserved

The classifier's own held-out accuracy is not recomputed here: see :func:`classifier_accuracy`.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from scipy import linalg

from ..domains import EVAL_SEED
from . import renderer
from .classifier import EVAL_SEED as CLASSIFIER_EVAL_SEED, RESOLUTION, factor_errors, prepare_images
from .renderer import ATTRIBUTES, CATEGORICAL, CONFLICTS, SOURCE_FACTORS

if TYPE_CHECKING:
    from ..checkpoint import ExpandedGenerator

__all__ = [
    "FORMAT_NAME", "frechet_distance", "frechet_distance_from_stats", "resolve_attributes", "evaluate",
    "evaluation_grid", "classifier_accuracy", "REPORT_KEYS", "EVAL_SEED",
]

FORMAT_NAME = "expander.world.metrics"
REPORT_KEYS = (
    "format", "version", "n_samples", "seed", "domains", "attribute_of", "unmapped_domains", "source_preservation",
    "domain_success", "reference_success", "leakage", "attribute_rates", "alignment", "composition", "subjects", "summary", "factor_tolerance",
    "reliable_factors",
)
BASE = "base"
_RENDER_SEED_OFFSET = 7_919  # source renders compared with base samples: seed + this (+1 for the floor set)


# --------------------------------------------------------------------------------------------------
# Fréchet distance
# --------------------------------------------------------------------------------------------------


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a (numerically) positive semi-definite matrix."""
    values, vectors = linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance_from_stats(mu_a, sigma_a, mu_b, sigma_b) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), in float64.

    Uses the symmetric form of the cross term, whose eigenvalues are real and non-negative, so no
    complex parts or negative traces appear for singular (rank-deficient) covariances.
    """
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    sigma_a, sigma_b = np.atleast_2d(np.asarray(sigma_a, np.float64)), np.atleast_2d(np.asarray(sigma_b, np.float64))
    if mu_a.shape != mu_b.shape or sigma_a.shape != sigma_b.shape:
        raise ValueError(f"feature sets differ in dimension: {mu_a.shape} vs {mu_b.shape}")
    root_a = _sqrt_psd(sigma_a)
    cross = root_a @ sigma_b @ root_a
    cross_values = linalg.eigvalsh((cross + cross.T) / 2)
    trace_cross = np.sqrt(np.clip(cross_values, 0, None)).sum()
    value = float(np.square(mu_a - mu_b).sum() + np.trace(sigma_a) + np.trace(sigma_b) - 2 * trace_cross)
    return max(value, 0.0)


def frechet_distance(feats_a: Union[torch.Tensor, np.ndarray], feats_b: Union[torch.Tensor, np.ndarray]) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N_a, d) and (N_b, d)."""
    a = feats_a.detach().double().cpu().numpy() if torch.is_tensor(feats_a) else np.asarray(feats_a, np.float64)
    b = feats_b.detach().double().cpu().numpy() if torch.is_tensor(feats_b) else np.asarray(feats_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected two (N, d) feature arrays with the same d, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError("a Fréchet distance needs at least 2 samples per set")
    return frechet_distance_from_stats(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def canonical_attribute(name: str) -> str:
    """A domain or attribute name as the attribute it would be: '-' and ' ' read as '_', lower case."""
    return name.strip().lower().replace("-", "_").replace(" ", "_")


def resolve_attributes(domain_names: Sequence[str], attribute_of: Optional[dict[str, str]] = None) -> dict[str, Optional[str]]:
    """{domain: attribute or None}: the explicit mapping first, then the name itself if it is an attribute.

    A name matches with '-' or ' ' read as '_' (the domain ``blue-skin`` is the attribute ``blue_skin``),
    and so does an attribute the mapping names.
    """
    attribute_of = {domain: canonical_attribute(attribute) for domain, attribute in (attribute_of or {}).items()}
    unknown_domains = sorted(set(attribute_of) - set(domain_names))
    if unknown_domains:
        raise ValueError(f"attribute_of names domains the model does not have: {unknown_domains}; its domains: {list(domain_names)}")
    bad = {d: a for d, a in attribute_of.items() if a not in ATTRIBUTES}
    if bad:
        raise ValueError(f"attribute_of maps to unknown attributes {bad}; known: {list(ATTRIBUTES)}")
    def by_name(name: str) -> Optional[str]:
        return canonical_attribute(name) if canonical_attribute(name) in ATTRIBUTES else None

    return {name: attribute_of.get(name, by_name(name)) for name in domain_names}


def _or_dash(value: Optional[float]) -> str:
    """A report value for a table: 3 decimals, or '-' where nothing was measured (null)."""
    return "-" if value is None else f"{value:.3f}"


def _round(value: Optional[float], digits: int = 5) -> Optional[float]:
    if value is None or not math.isfinite(float(value)):
        return None
    return round(float(value), digits)


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return _round(sum(values) / len(values)) if values else None


@torch.no_grad()
def _synthesize(model: "ExpandedGenerator", w: torch.Tensor, strengths: dict[str, float], batch_size: int) -> torch.Tensor:
    latents = model.domain_latents(w, strengths)
    return torch.cat([model.generator.synthesis(chunk, noise_mode="const") for chunk in latents.split(batch_size)]).clamp(-1, 1).cpu()


@torch.no_grad()
def _classify(classifier, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Attribute probabilities, factors and features of 64x64-resized images."""
    images = prepare_images(images, RESOLUTION)
    if hasattr(classifier, "predict"):
        return {k: v.cpu() for k, v in classifier.predict(images).items()}
    return {
        "attributes": classifier.predict_attributes(images).cpu(),
        "factors": classifier.predict_factors(images).cpu(),
        "features": classifier.features(images).cpu(),
    }


@torch.no_grad()
def _perceptual(perceptual: Callable, a: torch.Tensor, b: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([perceptual(x, y).reshape(-1).cpu() for x, y in zip(a.split(batch_size), b.split(batch_size))])


def _spread(perceptual: Callable, images: torch.Tensor, batch_size: int) -> float:
    """Mean perceptual distance between the images of consecutive latents (i, i+1): how much samples differ."""
    if len(images) < 2:
        return 0.0
    return _perceptual(perceptual, images[:-1], images[1:], batch_size).mean().item()


def _preserved(predicted_a: torch.Tensor, predicted_b: torch.Tensor, tolerance: float) -> torch.Tensor:
    """(N, F) bool: factor unchanged (categorical equal, continuous within ``tolerance``)."""
    errors = factor_errors(predicted_a, predicted_b)
    preserved = errors <= tolerance
    for name in CATEGORICAL:
        preserved[:, SOURCE_FACTORS.index(name)] = errors[:, SOURCE_FACTORS.index(name)] == 0
    return preserved


def _rates(probabilities: torch.Tensor) -> torch.Tensor:
    return (probabilities > 0.5).float().mean(0)


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------


def evaluate(
    model: "ExpandedGenerator",
    n_samples: int = 256,
    seed: int = EVAL_SEED,
    parent: Optional["ExpandedGenerator"] = None,
    attribute_of: Optional[dict[str, str]] = None,
    pairs: Optional[Sequence[tuple[str, str]]] = None,
    batch_size: int = 64,
    progress: bool = True,
    classifier: Any = None,
    perceptual: Optional[Callable] = None,
    factor_tolerance: float = 0.1,
) -> dict[str, Any]:
    """Measure ``model`` (see the module docstring for the report's schema).

    ``pairs``: domain pairs for the composition test (default: every pair of mapped domains that draw two different attributes).
    ``classifier`` / ``perceptual``: the world's shipped networks by default (injectable for tests).
    """
    from tqdm.auto import tqdm

    if n_samples < 2:
        raise ValueError("n_samples must be at least 2")
    if classifier is None:
        from .classifier import load_world_classifier

        classifier = load_world_classifier()
    if perceptual is None:
        from .perceptual import load_world_perceptual

        perceptual = load_world_perceptual()
    names = model.domain_names
    attributes = resolve_attributes(names, attribute_of)
    reliable = [f for f in SOURCE_FACTORS if f in set(getattr(classifier, "reliable_factors", SOURCE_FACTORS))]
    reliable_index = [SOURCE_FACTORS.index(f) for f in reliable]
    mapped = [d for d in names if attributes[d] is not None]
    if pairs is None:  # two domains drawing one attribute are no composition (leakage skips them too)
        pairs = [(a, b) for a, b in itertools.combinations(mapped, 2) if attributes[a] != attributes[b]]
    pairs = [tuple(p) for p in pairs]
    for pair in pairs:
        if len(pair) != 2 or pair[0] == pair[1]:
            raise ValueError(f"composition pairs need two different domains, got {pair}")
        missing = [d for d in pair if d not in mapped]
        if missing:
            raise ValueError(f"composition pair {pair}: {missing} {'is' if len(missing) == 1 else 'are'} not a domain with a known attribute (mapped domains: {mapped}); pass attribute_of")

    bar = tqdm(total=2 + 2 * len(names) + len(pairs), disable=not progress, desc="evaluate")
    w = model.random_latents(n_samples, seed)

    # (a) source preservation
    base_images = _synthesize(model, w, {}, batch_size)
    base = _classify(classifier, base_images)
    base_spread = _spread(perceptual, base_images, batch_size)
    renders = renderer.sample_portraits(n_samples, seed + _RENDER_SEED_OFFSET, with_captions=False).images
    floor = renderer.sample_portraits(n_samples, seed + _RENDER_SEED_OFFSET + 1, with_captions=False).images
    render_features = _classify(classifier, renders)["features"]
    source = {
        "fid": _round(frechet_distance(base["features"], render_features)),
        "fid_floor": _round(frechet_distance(_classify(classifier, floor)["features"], render_features)),
        "parent_fid": None,
    }
    bar.update(1)
    if parent is not None:
        parent_images = _synthesize(parent, parent.random_latents(n_samples, seed), {}, batch_size)
        source["parent_fid"] = _round(frechet_distance(_classify(classifier, parent_images)["features"], render_features))
    bar.update(1)

    # (b, c, d) per domain
    rows: dict[str, torch.Tensor] = {BASE: _rates(base["attributes"])}
    alignment: dict[str, Any] = {}
    for name in names:
        images = _synthesize(model, w, {name: 1.0}, batch_size)
        out = _classify(classifier, images)
        rows[name] = _rates(out["attributes"])
        bar.update(1)
        preserved = _preserved(base["factors"], out["factors"], factor_tolerance)
        entry = {
            "perceptual": _round(_perceptual(perceptual, base_images, images, batch_size).mean().item()),
            "factors_preserved": _round(preserved[:, reliable_index].float().mean().item()),
            "per_factor": {f: _round(preserved[:, i].float().mean().item(), 4) for i, f in enumerate(SOURCE_FACTORS)},
            "reference_factors_preserved": None,
            "diversity": _round(_spread(perceptual, images, batch_size) / base_spread) if base_spread > 0 else None,
        }
        if attributes[name] is not None:
            entry["reference_factors_preserved"] = _round(_reference_preservation(classifier, attributes[name], n_samples, seed, factor_tolerance, reliable_index))
        alignment[name] = entry
        bar.update(1)

    success = {d: _round(rows[d][ATTRIBUTES.index(attributes[d])].item()) for d in mapped}
    ceilings = {a: _round(_reference_rate(classifier, (a,), n_samples, seed)) for a in {attributes[d] for d in mapped}}  # once per attribute
    reference_success = {d: ceilings[attributes[d]] for d in mapped}
    matrix = {row: {col: _round(rows[row][ATTRIBUTES.index(attributes[col])].item()) for col in mapped} for row in [BASE, *mapped]}

    # (e) composition
    composition: dict[str, Any] = {}
    conflicts = {frozenset(c) for c in CONFLICTS}
    for first, second in pairs:
        images = _synthesize(model, w, {first: 1.0, second: 1.0}, batch_size)
        labelled = _classify(classifier, images)["attributes"] > 0.5
        a, b = ATTRIBUTES.index(attributes[first]), ATTRIBUTES.index(attributes[second])
        composition[f"{first}+{second}"] = {
            "domains": [first, second],
            "attributes": [attributes[first], attributes[second]],
            "both": _round((labelled[:, a] & labelled[:, b]).float().mean().item()),
            "first": _round(labelled[:, a].float().mean().item()),
            "second": _round(labelled[:, b].float().mean().item()),
            "conflicting": frozenset((attributes[first], attributes[second])) in conflicts,
            "reference_both": _round(_reference_rate(classifier, (attributes[first], attributes[second]), n_samples, seed)),
        }
        bar.update(1)
    bar.close()

    off_diagonal = [matrix[r][c] for r in mapped for c in mapped if r != c and attributes[r] != attributes[c]]
    summary = {
        "mean_success": _mean(list(success.values())),
        "reference_mean_success": _mean(list(reference_success.values())),
        "mean_leakage": _mean(off_diagonal),
        "mean_base_false_positive": _mean([matrix[BASE][c] for c in mapped]),
        "mean_perceptual": _mean([a["perceptual"] for a in alignment.values()]),
        "mean_factors_preserved": _mean([a["factors_preserved"] for a in alignment.values()]),
        "mean_composition": _mean([c["both"] for c in composition.values() if not c["conflicting"]]),
        "reference_mean_composition": _mean([c["reference_both"] for c in composition.values() if not c["conflicting"]]),
        "mean_diversity": _mean([a["diversity"] for a in alignment.values()]),
    }
    # MyStyle domains of a world subject: how well they reproduce it (their "success").
    subjects = {}
    for domain in getattr(model, "domains", ()):  # optional: the benchmarks' baselines wrap other generators
        subject = renderer.world_subject_seed(domain.images) if domain.method == "mystyle" else None
        if subject is not None:
            photos = renderer.subject_photos(subject)  # at the world resolution; the classifier sees 64 px anyway
            subjects[domain.name] = subject_match(model, domain.name, photos, n_samples=n_samples, seed=seed, classifier=classifier, factor_tolerance=factor_tolerance, batch_size=batch_size)
    return {
        "format": FORMAT_NAME,
        "version": 1,
        "n_samples": int(n_samples),
        "seed": int(seed),
        "domains": list(names),
        "attribute_of": attributes,
        "unmapped_domains": [d for d in names if attributes[d] is None],
        "source_preservation": source,
        "domain_success": success,
        "reference_success": reference_success,
        "leakage": {"rows": [BASE, *mapped], "columns": list(mapped), "matrix": matrix},
        "attribute_rates": {row: {a: _round(rates[i].item(), 4) for i, a in enumerate(ATTRIBUTES)} for row, rates in rows.items()},
        "alignment": alignment,
        "composition": composition,
        "subjects": subjects,
        "summary": summary,
        "factor_tolerance": factor_tolerance,
        "reliable_factors": reliable,
    }


@torch.no_grad()
def _reference_preservation(classifier, attribute: str, n: int, seed: int, tolerance: float, columns: list[int]) -> float:
    """Factor preservation the classifier measures between renders without and with ``attribute``."""
    n = min(n, 256)
    factors = renderer.sample_factors(n, seed + _RENDER_SEED_OFFSET + 2)
    plain = renderer.render(factors)
    changed = renderer.render(factors, renderer.attribute_labels(n, attribute))
    return _preserved(_classify(classifier, plain)["factors"], _classify(classifier, changed)["factors"], tolerance)[:, columns].float().mean().item()


@torch.no_grad()
def _reference_rate(classifier, drawn: tuple[str, ...], n: int, seed: int) -> float:
    """The share of renders drawn with the ``drawn`` attributes (conflicts resolved as the renderer
    does) that the classifier labels with all of them: what a perfect domain (one attribute) or pair
    of domains (two) scores."""
    n = min(n, 256)
    factors = renderer.sample_factors(n, seed + _RENDER_SEED_OFFSET + 3)
    labels = torch.zeros(n, len(ATTRIBUTES), dtype=torch.bool)
    for attribute in drawn:
        labels |= renderer.attribute_labels(n, attribute)  # render() resolves conflicts
    seen = _classify(classifier, renderer.render(factors, labels))["attributes"] > 0.5  # (n, A)
    return seen[:, [ATTRIBUTES.index(a) for a in drawn]].all(1).float().mean().item()


@torch.no_grad()
def evaluation_grid(model: "ExpandedGenerator", path: Union[str, Path], n: int = 8, seed: int = EVAL_SEED) -> Path:
    """PNG with one row per domain (base first), the same ``n`` identities in every column."""
    from ..utils.images import save_grid

    w = model.random_latents(n, seed)
    rows = [_synthesize(model, w, {}, n)] + [_synthesize(model, w, {name: 1.0}, n) for name in model.domain_names]
    return save_grid(torch.cat(rows), path, nrow=n)


def classifier_accuracy(n: int = 2000, seed: int = CLASSIFIER_EVAL_SEED, classifier: Any = None) -> dict[str, Any]:
    """The classifier's held-out accuracy on ``n`` fresh renders (attribute_prob 0.15).

    Returns :func:`expander.world.classifier.evaluate_world_classifier`'s dict: per-attribute
    ``attribute_accuracy`` (and recall / precision), ``min_attribute_accuracy``, categorical
    ``factor_accuracy`` and continuous ``factor_mae``.
    """
    from .classifier import evaluate_world_classifier, load_world_classifier

    return evaluate_world_classifier(classifier if classifier is not None else load_world_classifier(), n=n, seed=seed)


def format_report(report: dict[str, Any]) -> str:
    """A short plain-text summary of :func:`evaluate`'s report (plus ``report["classifier"]`` if present)."""
    source = report["source_preservation"]
    parent_fid = "-" if source["parent_fid"] is None else f"{source['parent_fid']:.2f}"
    lines = [
        f"samples per domain: {report['n_samples']} (seed {report['seed']})",
        f"source preservation: FD to renders {source['fid']:.2f} (parent {parent_fid}; two render sets {source['fid_floor']:.2f})",
    ]
    base_rates = report["attribute_rates"]["base"]
    worst = max(base_rates, key=base_rates.get)
    lines.append(f"base samples labelled with any attribute: max {base_rates[worst]:.3f} ({worst})")
    if report["domains"]:
        # "of renders": the success a perfect domain scores (reference_success; absent from old reports)
        lines.append(f"{'domain':<14}{'success':>9}{'of renders':>12}{'max leak':>10}{'perceptual':>12}{'factors kept':>14}{'diversity':>11}")
        ceilings = report.get("reference_success", {})
        matrix = report["leakage"]["matrix"]
        for name in report["domains"]:
            success = report["domain_success"].get(name)
            # as mean_leakage: a domain that draws the same attribute as this one is not leaked into
            leaks = [v for col, v in matrix.get(name, {}).items() if col != name and report["attribute_of"].get(col) != report["attribute_of"].get(name)]
            align = report["alignment"][name]
            lines.append(
                f"{name:<14}{'-' if success is None else f'{success:.3f}':>9}{_or_dash(ceilings.get(name)):>12}{max(leaks) if leaks else 0.0:>10.3f}"
                f"{align['perceptual']:>12.4f}{_or_dash(align.get('factors_preserved')):>14}{_or_dash(align.get('diversity')):>11}"
            )
        unmapped = [d for d in report.get("unmapped_domains", []) if d not in report.get("subjects", {})]
        if unmapped:
            lines.append(
                f"no world attribute for {', '.join(unmapped)} (success and leakage '-'): name the attribute with "
                f"`expander eval --attribute {unmapped[0]}=ATTRIBUTE` (one of {', '.join(ATTRIBUTES)})"
            )
        if report["composition"]:
            ceiling = report["summary"].get("reference_mean_composition")
            lines.append(f"composition (both attributes): mean {report['summary']['mean_composition']}" + ("" if ceiling is None else f" (renders with both: {ceiling})"))
        for name, subject in report.get("subjects", {}).items():
            lines.append(
                f"{name}: identity match {subject['domain_match']:.3f} (base subspace at the same latents {subject['base_same_latents_match']:.3f}, "
                f"random base samples {subject['base_match']:.3f}, the subject's photos {subject['subject_photos_match']:.3f})"
            )
    if "classifier" in report:
        accuracy = report["classifier"]["attribute_accuracy"]
        lines.append(f"evaluation classifier on {report['classifier']['n']} held-out renders: min accuracy {min(accuracy.values()):.3f} ({min(accuracy, key=accuracy.get)}), mean {sum(accuracy.values()) / len(accuracy):.3f}")
    return "\n".join(lines)


# Factors a world subject keeps in every pose (renderer.subject_factors varies the others).
POSE_FACTORS = ("head_x", "head_y", "tilt", "mouth_curve", "background_hue")


@torch.no_grad()
def subject_match(
    model: "ExpandedGenerator",
    domain: str,
    subject_images: torch.Tensor,
    n_samples: int = 256,
    seed: int = 0,
    classifier: Any = None,
    factor_tolerance: float = 0.1,
    batch_size: int = 64,
) -> dict[str, Any]:
    """How well a MyStyle domain reproduces one subject: identity factors of its samples vs. the subject's.

    For every sample, the fraction of *identity* factors (reliable, not pose: see ``POSE_FACTORS``) whose
    prediction agrees with the subject's (the majority over ``subject_images``: categorical equal,
    continuous within ``factor_tolerance``). Reported for the domain's samples (drawn the way
    ``model.sample`` draws them: between the subject's anchors when the domain has them), for the
    base subspace at the same latents (what the parent's inversions alone give), for base samples of
    random latents (chance level) and for the subject's own photos (ceiling).
    """
    if classifier is None:
        from .classifier import load_world_classifier

        classifier = load_world_classifier()
    reliable = set(getattr(classifier, "reliable_factors", SOURCE_FACTORS))
    columns = [SOURCE_FACTORS.index(f) for f in SOURCE_FACTORS if f in reliable and f not in POSE_FACTORS]
    subject = _classify(classifier, subject_images)["factors"]  # (P, F)
    reference = subject.median(dim=0).values  # robust "the subject's" factors
    for name in CATEGORICAL:
        column = SOURCE_FACTORS.index(name)
        reference[column] = subject[:, column].mode().values

    def agreement(images: torch.Tensor) -> float:
        predicted = _classify(classifier, images)["factors"]
        return _preserved(predicted, reference.expand_as(predicted), factor_tolerance)[:, columns].float().mean().item()

    w_domain = model.sampling_latents(domain, n_samples, seed)
    return {
        "domain": domain,
        "identity_factors": [SOURCE_FACTORS[c] for c in columns],
        "anchored": model.anchors(domain) is not None,
        "domain_match": _round(agreement(_synthesize(model, w_domain, {domain: 1.0}, batch_size))),
        "base_same_latents_match": _round(agreement(_synthesize(model, w_domain, {}, batch_size))),
        "base_match": _round(agreement(_synthesize(model, model.random_latents(n_samples, seed), {}, batch_size))),
        "subject_photos_match": _round(agreement(subject_images)),
    }
