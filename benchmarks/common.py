"""Shared pieces of the paper benchmarks (``benchmarks/*.py``): models, prompts, measurement, output.

* :func:`base_parser` / :func:`setup`: the options every script has (``--model``, ``--smoke``,
  ``--out``, ``--seed``, ``--threads``, ...).
* :func:`load_parent`: the world parent (``expander.hub.load_model``) or, with ``--smoke``, a tiny
  random StyleGAN2 (16 px, W of 32) that still counts as a world model, so the world CLIP, the
  world perceptual network and the world classifier are used exactly as in a real run.
* :func:`domain_specs`: world domains (name, NADA prompt, attribute) for any N; beyond the 17 world
  attributes the names repeat attributes with paraphrased prompts (``hat-2``: "... wearing a top hat").
* :class:`NadaAdaptation`: the StyleGAN-NADA domain-*adaptation* baseline (one generator per domain).
* :class:`WorldMeter`: :func:`expander.world.metrics.evaluate` with the world classifier and
  perceptual network loaded once, plus the cheap measurements the curves need (attribute rates of
  a domain's samples, Fréchet distances to renders).
* :func:`markdown_table`, :func:`write_results`, :func:`pyplot`: the printed table, ``results.json``
  and the PNG plots.

The benchmark scripts import this file as ``common`` (they put their own folder on ``sys.path``).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch

from expander.checkpoint import ExpandedGenerator
from expander.domains import Domain
from expander.generators.stylegan2 import Generator, StyleGAN2Config
from expander.losses import loss_nada
from expander.train import ExpansionConfig
from expander.world import metrics, renderer
from expander.world.renderer import ATTRIBUTES, ATTRIBUTE_PHRASES

logger = logging.getLogger("benchmarks")

SOURCE_PROMPT = "a portrait of a person"  # == expander.world.clip.SOURCE_PROMPT and ExpansionConfig.source_prompt

# NADA prompts of the world attributes (the wording of recipes/world-nada-10.yaml; every word is in the
# world CLIP's vocabulary, which tests/benchmarks/test_paper_smoke.py checks).
PROMPTS: dict[str, str] = {
    "glasses": "a portrait of a person with glasses",
    "zombie": "a portrait of a zombie",
    "beard": "a portrait of a person with a beard",
    "hat": "a portrait of a person wearing a hat",
    "crown": "a portrait of a person wearing a crown",
    "clown_nose": "a portrait of a person with a clown nose",
    "eyepatch": "a portrait of a person wearing an eyepatch",
    "blue_skin": "a portrait of a person with blue skin",
    "sketch": "a sketch of a person",
    "pop_art": "a pop art portrait of a person",
    "sunglasses": "a portrait of a person wearing sunglasses",
    "moustache": "a portrait of a person with a moustache",
    "fangs": "a portrait of a person with fangs",
    "freckles": "a portrait of a person with freckles",
    "elf_ears": "a portrait of a person with elf ears",
    "cat_ears": "a portrait of a person with cat ears",
    "pixel_art": "a pixel art portrait of a person",
}
# Default order: the ten domains recipes/world-nada-10.yaml had when the benchmarks were first run
# (with sketch; the recipe has freckles in its place since 2026-12-02), then the other seven. Kept, so
# that the benchmarks' published numbers stay comparable from run to run.
DOMAIN_ORDER: tuple[str, ...] = tuple(PROMPTS)
assert sorted(PROMPTS) == sorted(ATTRIBUTES)


# --------------------------------------------------------------------------------------------------
# Command line, set-up, output
# --------------------------------------------------------------------------------------------------


def base_parser(name: str, doc: Optional[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"benchmarks/{name}.py", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="parent model: registry name, folder or Hub id (default: the built-in world parent)")
    parser.add_argument("--smoke", action="store_true", help="tiny random generator, a few steps: seconds (what the tests run)")
    parser.add_argument("--out", default=f"runs/bench/{name}", help="folder for results.json and the plots (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="training seed (latents, domain choice)")
    parser.add_argument("--eval-seed", type=int, default=metrics.EVAL_SEED, help="seed of the evaluation latents and renders")
    parser.add_argument("--eval-samples", type=int, default=None, help="samples per measurement (default depends on the script)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def setup(args: argparse.Namespace) -> Path:
    torch.set_num_threads(max(1, args.threads))
    torch.manual_seed(args.seed)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.progress = not (args.no_progress or args.smoke)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def environment(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(), "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "smoke": bool(args.smoke), "model": args.model or ("tiny-random" if args.smoke else "default"),
        "argv": list(sys.argv[1:]),
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def write_results(out: Path, results: dict[str, Any]) -> Path:
    path = out / "results.json"
    path.write_text(json.dumps(_jsonable(results), indent=2, allow_nan=False) + "\n")
    return path


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e4 or abs(value) < 10 ** -digits):
            return f"{value:.2e}"
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


class Stopwatch:
    def __enter__(self) -> "Stopwatch":
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start


# --------------------------------------------------------------------------------------------------
# Models and domains
# --------------------------------------------------------------------------------------------------


def tiny_world_model(seed: int = 0, resolution: int = 16, style_dim: int = 32) -> ExpandedGenerator:
    """A random 16 px StyleGAN2 wrapped as a *world* model (so world guidance and metrics apply)."""
    from expander.subspace.dormancy import latent_step_size
    from expander.world.parent import ALPHA_IN_STDS, WORLD_BASE_MODEL

    torch.manual_seed(seed)
    channels = {2**i: {4: 16, 8: 16, 16: 8}.get(2**i, 8) for i in range(2, resolution.bit_length())}
    G = Generator(StyleGAN2Config(resolution=resolution, style_dim=style_dim, n_mlp=2, channels=channels)).eval()
    G.style.update_w_avg(1024, generator=torch.Generator().manual_seed(seed))
    model = ExpandedGenerator.from_generator(G, alpha=1.0, num_dormant=style_dim // 2, base_model=WORLD_BASE_MODEL, description="tiny random smoke-test model")
    model.alpha = round(latent_step_size(model.generator, model.basis, step_scale=ALPHA_IN_STDS, n_samples=256), 4)
    return model.eval()


def load_parent(args: argparse.Namespace) -> ExpandedGenerator:
    """The parent every run starts from (never trained in place: use :func:`fresh_copy`)."""
    if args.smoke:
        model = tiny_world_model(args.seed)
    else:
        from expander.hub import load_model

        model = load_model(args.model)
    if model.domains:
        logger.info("parent %s already has domains %s; the benchmarks add theirs on free directions", args.model, model.domain_names)
    model.generator.requires_grad_(False)
    return model.eval()


def fresh_copy(model: ExpandedGenerator) -> ExpandedGenerator:
    return copy.deepcopy(model)


@dataclass
class DomainSpec:
    name: str
    prompt: str
    attribute: str

    def domain(self, direction: int = -1, alpha: Optional[float] = None) -> Domain:
        return Domain(self.name, direction=direction, method="nada", prompt=self.prompt, source_prompt=SOURCE_PROMPT, alpha=alpha)


def _paraphrase_prompt(attribute: str, phrase: str) -> str:
    """The world CLIP's NADA prompt form for any phrase: "a portrait of a person with {phrase}"."""
    from expander.world.clip import attribute_prompt

    return attribute_prompt(attribute, phrase)


def domain_specs(n: int, names: Optional[Sequence[str]] = None) -> list[DomainSpec]:
    """``n`` world domains: ``names`` (attributes, default :data:`DOMAIN_ORDER`) first, then paraphrases.

    Domain ``k`` beyond the named ones reuses an attribute with its next paraphrase (``hat-2``:
    "a portrait of a person wearing a brimmed hat"), so N may exceed the 17 world attributes.
    """
    names = list(names or DOMAIN_ORDER)
    unknown = [a for a in names if a not in PROMPTS]
    if unknown:
        raise ValueError(f"unknown world attributes {unknown}; known: {list(PROMPTS)}")
    specs = [DomainSpec(a, PROMPTS[a], a) for a in names[:n]]
    round_index = 1
    while len(specs) < n:
        for attribute in names:
            if len(specs) == n:
                break
            phrases = ATTRIBUTE_PHRASES[attribute]
            phrase = phrases[round_index % len(phrases)]
            specs.append(DomainSpec(f"{attribute}-{round_index + 1}", _paraphrase_prompt(attribute, phrase), attribute))
        round_index += 1
    return specs


def attribute_map(specs: Sequence[DomainSpec]) -> dict[str, str]:
    """``attribute_of`` for :func:`metrics.evaluate`: only the names that are not attributes themselves."""
    return {s.name: s.attribute for s in specs if s.name != s.attribute}


def add_domains(model: ExpandedGenerator, specs: Sequence[DomainSpec], alpha: Optional[float] = None) -> list[Domain]:
    """Register ``specs`` on the most dormant free directions (public API: ``model.add_domain``)."""
    return [model.add_domain(spec.domain(alpha=alpha)) for spec in specs]


def expansion_config(args: argparse.Namespace, steps: int, **overrides: Any) -> ExpansionConfig:
    """The training settings of a benchmark run (tiny batches in smoke mode).

    The benchmarks pass no real-image sampler to ``expand``, so there is no GAN loss: training is the
    adaptation loss + replay, the same for every method they compare.
    """
    values: dict[str, Any] = dict(steps=steps, seed=args.seed, checkpoint_every=10**9, source_prompt=SOURCE_PROMPT)
    if args.smoke:
        values.update(batch_size=2, base_batch_size=2)
    values.update(overrides)
    return ExpansionConfig(**values)


def nada_guidance(model: ExpandedGenerator, device: str = "cpu"):
    """World CLIP + world perceptual for world models (``expander.guidance.build.build_guidance``), built once."""
    from expander.guidance.build import build_guidance

    return build_guidance(model, ["nada"], device=device)


def checkpoint_bytes(tensors: dict[str, torch.Tensor], extra_files: dict[str, str]) -> int:
    """Bytes on disk of a safetensors file of ``tensors`` plus small JSON files (written to a temp dir)."""
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, os.path.join(tmp, "model.safetensors"))
        for name, text in extra_files.items():
            Path(tmp, name).write_text(text)
        return sum(f.stat().st_size for f in Path(tmp).iterdir())


def expanded_checkpoint_bytes(model: ExpandedGenerator) -> int:
    """What one expanded checkpoint needs to sample every domain: weights + basis, config, domains registry."""
    domains = json.dumps({"domains": [d.to_dict() for d in model.domains]}, indent=2)
    return checkpoint_bytes(model.weights_dict(), {"config.json": json.dumps(model.config_dict(), indent=2), "domains.json": domains})


def generator_checkpoint_bytes(generator: Generator) -> int:
    """One stand-alone (domain-adapted) generator: its weights + mean w, and its config."""
    tensors = {f"generator.{k}": v for k, v in generator.state_dict().items()}
    tensors["latent_avg"] = generator.w_avg
    return checkpoint_bytes(tensors, {"config.json": json.dumps({"generator": generator.config.to_dict()}, indent=2)})


# --------------------------------------------------------------------------------------------------
# The domain-adaptation baseline (StyleGAN-NADA)
# --------------------------------------------------------------------------------------------------


@dataclass
class AdaptationConfig:
    steps: int = 300
    batch_size: int = 4  # = ExpansionConfig.batch_size: the same latents per adaptation-loss evaluation
    lr: float = 0.002
    betas: tuple = (0.0, 0.99)
    seed: int = 0
    source_prompt: str = SOURCE_PROMPT


class NadaAdaptation:
    """StyleGAN-NADA (Gal et al. 2021) domain adaptation: the baseline that expansion replaces.

    A copy of the generator whose *whole synthesis network* is fine-tuned with the directional CLIP
    loss (:func:`expander.losses.loss_nada`); the image direction is (trainable generator's image -
    frozen generator's image) for the same w. No subspaces, no replay, no GAN loss: the adapted
    generator makes only the new domain (the source domain is lost). Simplifications against the
    original: every synthesis layer is trained (no adaptive layer selection), the mapping network is
    frozen like in the original, and noise is the generator's constant noise.
    """

    def __init__(self, generator: Generator, clip, prompt: str, config: Optional[AdaptationConfig] = None):
        self.config = config = config or AdaptationConfig()
        self.clip, self.prompt = clip, prompt
        self.frozen = copy.deepcopy(generator).eval().requires_grad_(False)
        self.generator = copy.deepcopy(generator).eval().requires_grad_(False)
        self.params = self.generator.synthesis_parameters()
        for p in self.params:
            p.requires_grad_(True)
        self.optimizer = torch.optim.Adam(self.params, lr=config.lr, betas=config.betas)
        self.rng = torch.Generator().manual_seed(config.seed)
        self.step_index = 0

    def step(self) -> float:
        config = self.config
        z = torch.randn(config.batch_size, self.generator.style_dim, generator=self.rng).to(self.generator.w_avg.device)
        with torch.no_grad():
            w = self.frozen.mapping(z)
            source = self.frozen.synthesis(w)
        loss = loss_nada(self.clip, self.generator.synthesis(w), source, config.source_prompt, self.prompt)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step_index += 1
        return float(loss.detach())

    def run(self, steps: Optional[int] = None, progress: bool = False) -> Generator:
        from tqdm.auto import tqdm

        for _ in tqdm(range(steps if steps is not None else self.config.steps), disable=not progress, desc=f"adapt {self.prompt[:24]}", leave=False):
            self.step()
        return self.result()

    def result(self) -> Generator:
        self.generator.requires_grad_(False)
        return self.generator.eval()


def with_generator(model: ExpandedGenerator, generator: Generator) -> ExpandedGenerator:
    """A copy of ``model`` (no domains) whose generator weights are ``generator``'s, to measure it with
    :func:`metrics.evaluate`: its "base" samples are then the adapted generator's samples."""
    out = fresh_copy(model)
    out.set_domains([])
    out.generator.load_state_dict(generator.state_dict(), strict=True)
    return out


def interpolate_generators(a: Generator, b: Generator, t: float) -> Generator:
    """Weights (1 - t) * a + t * b (StyleGAN-NADA's way of combining two adapted generators)."""
    out = copy.deepcopy(a)
    state_b = b.state_dict()
    out.load_state_dict({k: torch.lerp(v, state_b[k], t) if v.is_floating_point() else v for k, v in a.state_dict().items()})
    return out


# --------------------------------------------------------------------------------------------------
# Measurement in the world
# --------------------------------------------------------------------------------------------------


class WorldMeter:
    """The world's evaluation classifier and perceptual network, loaded once.

    ``report`` is :func:`expander.world.metrics.evaluate`; the other methods are the pieces of it the
    learning curves need at a fraction of the cost (no alignment, no renders per call).
    """

    def __init__(self, n_samples: int, seed: int, batch_size: int = 64):
        from expander.world.classifier import load_world_classifier
        from expander.world.perceptual import load_world_perceptual

        self.classifier = load_world_classifier()
        self.perceptual = load_world_perceptual()
        self.n_samples, self.seed, self.batch_size = n_samples, seed, batch_size
        self._render_cache: dict[tuple, torch.Tensor] = {}

    def report(self, model, parent=None, attribute_of: Optional[dict] = None, pairs: Optional[Sequence] = (), n_samples: Optional[int] = None) -> dict[str, Any]:
        """Full :func:`metrics.evaluate` report (``pairs=None``: every pair of domains)."""
        return metrics.evaluate(
            model, n_samples=n_samples or self.n_samples, seed=self.seed, parent=parent, attribute_of=attribute_of,
            pairs=None if pairs is None else list(pairs), batch_size=self.batch_size, progress=False,
            classifier=self.classifier, perceptual=self.perceptual,
        )

    @torch.no_grad()
    def images(self, model, strengths: dict[str, float], n: Optional[int] = None) -> torch.Tensor:
        """Samples of ``model`` from the evaluation latents (the same identities for every ``strengths``)."""
        w = model.domain_latents(model.random_latents(n or self.n_samples, self.seed), strengths)
        return torch.cat([model.generator.synthesis(c, noise_mode="const") for c in w.split(self.batch_size)]).clamp(-1, 1).cpu()

    @torch.no_grad()
    def generator_images(self, generator: Generator, n: Optional[int] = None) -> torch.Tensor:
        """Samples of a plain generator from the same seeded z as :meth:`images` (no subspaces)."""
        z = torch.randn(n or self.n_samples, generator.style_dim, generator=torch.Generator().manual_seed(self.seed)).to(generator.w_avg.device)
        w = generator.mapping(z)
        return torch.cat([generator.synthesis(c, noise_mode="const") for c in w.split(self.batch_size)]).clamp(-1, 1).cpu()

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v.cpu() for k, v in self.classifier.predict(images).items()}

    def rates(self, images: torch.Tensor) -> dict[str, float]:
        """{attribute: fraction of images labelled with it (probability > 0.5)}."""
        labelled = self.predict(images)["attributes"] > 0.5
        return {a: float(labelled[:, i].float().mean()) for i, a in enumerate(ATTRIBUTES)}

    def both_rate(self, images: torch.Tensor, first: str, second: str) -> dict[str, float]:
        labelled = self.predict(images)["attributes"] > 0.5
        a, b = labelled[:, ATTRIBUTES.index(first)], labelled[:, ATTRIBUTES.index(second)]
        return {"first": float(a.float().mean()), "second": float(b.float().mean()), "both": float((a & b).float().mean())}

    def success(self, model, attribute_of: dict[str, str], n: Optional[int] = None) -> dict[str, float]:
        """{domain: fraction of its samples labelled with its attribute} (``attribute_of``: every domain)."""
        return {name: self.rates(self.images(model, {name: 1.0}, n))[attribute] for name, attribute in attribute_of.items()}

    @torch.no_grad()
    def render_features(self, attribute: Optional[str], n: int) -> torch.Tensor:
        """Classifier features of ``n`` renders (the evaluation seed), with ``attribute`` on every one or none."""
        key = (attribute, n)
        if key not in self._render_cache:
            factors = renderer.sample_factors(n, self.seed + 31_337)
            labels = None if attribute is None else renderer.attribute_labels(n, attribute)
            self._render_cache[key] = self.predict(renderer.render(factors, labels))["features"]
        return self._render_cache[key]

    def fd(self, images: torch.Tensor, attribute: Optional[str] = None) -> float:
        """Fréchet distance (classifier features) of ``images`` to renders with ``attribute`` (None: source renders)."""
        return metrics.frechet_distance(self.predict(images)["features"], self.render_features(attribute, len(images)))


def summary_of(report: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of a :func:`metrics.evaluate` report."""
    s = report["summary"]
    return {
        "mean_success": s["mean_success"], "mean_leakage": s["mean_leakage"], "mean_base_false_positive": s["mean_base_false_positive"],
        "mean_perceptual": s["mean_perceptual"], "mean_factors_preserved": s["mean_factors_preserved"], "mean_composition": s["mean_composition"],
        "base_fid": report["source_preservation"]["fid"], "parent_fid": report["source_preservation"]["parent_fid"],
        "fid_floor": report["source_preservation"]["fid_floor"],
    }


__all__ = [
    "PROMPTS", "DOMAIN_ORDER", "SOURCE_PROMPT", "base_parser", "setup", "environment", "write_results", "markdown_table", "pyplot",
    "save_figure", "Stopwatch", "tiny_world_model", "load_parent", "fresh_copy", "DomainSpec", "domain_specs", "attribute_map",
    "add_domains", "expansion_config", "nada_guidance", "expanded_checkpoint_bytes", "generator_checkpoint_bytes", "AdaptationConfig",
    "NadaAdaptation", "with_generator", "interpolate_generators", "WorldMeter", "summary_of",
]
