"""Can the world CLIPs see a leak that the evaluation classifier reads? (What NADA's hinges can push against.)

For each domain of each expanded model given (and, for scale, for renders drawn with each attribute),
N samples are drawn with and without the domain at the same latents (renders: the same factors). The
script prints the share of the domain's samples that the world's evaluation classifier labels with the
TARGET attribute (the leak that ``expander eval`` counts), and for each world CLIP the mean projection
of the image edit (CLIP(domain image) - CLIP(base image)) on the CLIP's NADA text direction of the
target, next to the projection on the domain's own direction (how far the CLIP sees it move at all).

Every NADA loss and hinge of the trainer (text direction, dual ridge, text and image exclusivity) reads
the image through these CLIPs. A leak the classifier reads while the projection on the target is at or
below zero is one the CLIPs do not see: no weight of those losses can push against it, and what
removes it is a CLIP that tells the two pictures apart.

    python benchmarks/leak_visibility.py --target freckles runs/k2 runs/k4   # 256 samples each (a minute per model)
    python benchmarks/leak_visibility.py --smoke                              # seconds; what the test suite runs
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from expander.checkpoint import ExpandedGenerator  # noqa: E402
from expander.domains import BASE_DOMAIN, Domain  # noqa: E402
from expander.guidance.clip import ClipEncoder, ClipGuidance  # noqa: E402
from expander.world.classifier import load_world_classifier, prepare_images  # noqa: E402
from expander.world.clip import WORLD_CLIPS, WORLD_TEMPLATES  # noqa: E402
from expander.world.metrics import resolve_attributes  # noqa: E402
from expander.world.renderer import ATTRIBUTES, attribute_labels, render, sample_factors  # noqa: E402

NAME = "leak_visibility"


class _Measure:
    """The classifier and the world CLIPs, loaded once, and the target's text direction in each CLIP."""

    def __init__(self, target: str):
        self.target = target
        self.guidance = ClipGuidance([ClipEncoder.from_pretrained(str(WORLD_CLIPS[name])) for name in WORLD_CLIPS], templates=WORLD_TEMPLATES)
        self.classifier = load_world_classifier()
        self._directions: dict[tuple[str, str], torch.Tensor] = {}  # (CLIP name, attribute) -> (D,)

    def _direction(self, name: str, encoder: ClipEncoder, attribute: str) -> torch.Tensor:
        if (name, attribute) not in self._directions:
            self._directions[name, attribute] = self.guidance.text_direction(encoder, common.SOURCE_PROMPT, common.PROMPTS[attribute])
        return self._directions[name, attribute]

    @torch.no_grad()
    def row(self, source: str, attribute: Optional[str], base: torch.Tensor, edited: torch.Tensor) -> dict:
        """base / edited: (N, 3, H, W) in [-1, 1], the same latents or factors without and with the domain."""
        labelled = self.classifier.predict_attributes(prepare_images(edited)) > 0.5  # (N, A)
        row = {"source": source, "attribute": attribute, "classifier_target": float(labelled[:, ATTRIBUTES.index(self.target)].float().mean())}
        for name, encoder in zip(WORLD_CLIPS, self.guidance.encoders):
            edit = encoder.encode_images(edited) - encoder.encode_images(base)  # (N, D)
            row[f"{name}_target"] = float((edit @ self._direction(name, encoder, self.target)).mean())
            row[f"{name}_own"] = float((edit @ self._direction(name, encoder, attribute)).mean()) if attribute in common.PROMPTS else None
        return row


def measure(models: Sequence[str], target: str, n: int, seed: int, render_attributes: Sequence[str], smoke: bool = False) -> list[dict]:
    meter = _Measure(target)
    factors = sample_factors(n, seed)
    plain = render(factors)
    rows = [meter.row(f"render {a}", a, plain, render(factors, attribute_labels(n, a))) for a in render_attributes]
    loaded = [(common.tiny_world_model(), "tiny random model")] if smoke else [(ExpandedGenerator.from_pretrained(m), m) for m in models]
    for model, label in loaded:
        if smoke:  # a domain whose name is an attribute, on a random direction: the code path, not a number
            model.add_domain(Domain("beard", direction=-1, method="nada", prompt=common.PROMPTS["beard"]))
        attributes = resolve_attributes(model.domain_names)
        base = model.sample(BASE_DOMAIN, n=n, seed=seed)
        for domain in model.domain_names:
            if domain != target and attributes[domain] != target:
                rows.append(meter.row(f"{label}: {domain}", attributes[domain], base, model.sample(domain, n=n, seed=seed)))
    return rows


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:+.2f}"


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = common.base_parser(NAME, __doc__)
    parser.add_argument("models", nargs="*", help="expanded world models (folders or registered names) whose domains are measured")
    parser.add_argument("--target", default="freckles", choices=sorted(common.PROMPTS), help="the attribute the leaks go into (default: %(default)s)")
    parser.add_argument("--render-attributes", nargs="*", default=None, choices=sorted(common.PROMPTS), metavar="ATTRIBUTE",
                        help="attributes rendered for scale besides the target (default: blue_skin beard zombie eyepatch)")
    args = parser.parse_args(argv)
    out = common.setup(args)
    n = args.eval_samples or (4 if args.smoke else 256)
    renders = args.render_attributes if args.render_attributes is not None else [a for a in ("blue_skin", "beard", "zombie", "eyepatch") if a != args.target]
    rows = measure(args.models, args.target, n, args.eval_seed, [args.target, *renders], smoke=args.smoke)
    results = {"benchmark": NAME, "environment": common.environment(args), "settings": {"samples": n, "seed": args.eval_seed, "target": args.target, "models": list(args.models)}, "rows": rows}
    common.write_results(out, results)
    clips = list(WORLD_CLIPS)
    headers = ["source", f"classifier: {args.target}"] + [f"{c}: on {args.target} / own" for c in clips]
    table = [[r["source"], f"{r['classifier_target']:.0%}"] + [f"{_fmt(r[f'{c}_target'])} / {_fmt(r[f'{c}_own'])}" for c in clips] for r in rows]
    print(f"\n## Leaks into {args.target}: the classifier's reading and the world CLIPs' projections ({n} samples each)\n")
    print(common.markdown_table(headers, table))
    print(f"\nresults: {out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
