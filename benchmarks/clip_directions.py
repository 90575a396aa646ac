"""What does NADA pay a domain for drawing *another* domain's attribute? (Why jointly trained domains leak.)

For the ten domains of ``recipes/world-nada-10.yaml`` (or ``--attributes``), N source portraits are
rendered with and without each attribute. For each world CLIP and each way of building a domain's
text direction u_d, the script measures the pay matrix

    P[a, d] = mean over portraits of <CLIP(portrait with a) - CLIP(portrait), u_d>

which is what NADA's projection loss rewards the domain d for when its images change like a true
rendering of attribute a. The diagonal is the pay for drawing the domain's own attribute; an
off-diagonal entry is what a domain earns by drawing another domain's attribute instead (or on top:
the projection loss pays for every component along u_d). Direction modes:

- ``plain``: StyleGAN-NADA's text direction (``nada_contrast: 0``).
- ``centred``: the domains' directions centred on their mean (``nada_contrast: 1``, the default).
- ``dual R``: the ridge dual basis of the domains' directions (``nada_dual_ridge: R``).

Per mode it prints the mean and smallest diagonal, the mean positive off-diagonal pay, and per
domain the *worst leak ratio*: max over other attributes a of P[a, d] / P[d, d] (0.8: drawing that
other attribute earns 80% of what drawing the domain's own does).

    python benchmarks/clip_directions.py               # 256 portraits per attribute (about a minute)
    python benchmarks/clip_directions.py --smoke       # seconds; what the test suite runs
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from expander.guidance.clip import ClipEncoder, ClipGuidance  # noqa: E402
from expander.recipes import Recipe  # noqa: E402
from expander.world.clip import WORLD_CLIPS, WORLD_TEMPLATES  # noqa: E402
from expander.world.renderer import ATTRIBUTES, attribute_labels, render, sample_factors  # noqa: E402

NAME = "clip_directions"
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "world-nada-10.yaml"
DEFAULT_RIDGES = (0.05, 0.1, 0.2)


def recipe_attributes() -> list[str]:
    """The recipe's NADA domains, which are named after world attributes."""
    return [d.name for d in Recipe.load(RECIPE).domains if d.method == "nada" and d.name in ATTRIBUTES]


def text_directions(guidance: ClipGuidance, encoder: ClipEncoder, attributes: Sequence[str], contrast_strength: float, ridge: Optional[float]) -> torch.Tensor:
    """(A, D): each attribute's direction u_d as the trainer builds it, the others as its contrast prompts."""
    return torch.stack([
        guidance.text_direction(encoder, common.SOURCE_PROMPT, common.PROMPTS[a], [common.PROMPTS[o] for o in attributes if o != a], contrast_strength, ridge)
        for a in attributes
    ])


def summarise(pay: torch.Tensor, attributes: Sequence[str]) -> dict:
    """Diagonal, positive off-diagonal pay and each domain's worst leak ratio of an (A, A) pay matrix."""
    diagonal = pay.diagonal()
    off = ~torch.eye(len(attributes), dtype=torch.bool)
    ratios = (pay / diagonal[None, :]).masked_fill(~off, float("-inf"))  # column d: other attributes' pay / own
    worst = ratios.max(0)
    return {
        "diagonal_mean": float(diagonal.mean()), "diagonal_min": float(diagonal.min()),
        "off_diagonal_positive_mean": float(pay[off].clamp(min=0).mean()),
        "worst_leak": {d: {"attribute": attributes[int(i)], "ratio": float(r)} for d, r, i in zip(attributes, worst.values, worst.indices)},
        "pay": {a: {d: float(pay[i, j]) for j, d in enumerate(attributes)} for i, a in enumerate(attributes)},
    }


def measure(n: int, seed: int, attributes: Sequence[str], ridges: Sequence[float]) -> dict:
    guidance = ClipGuidance([ClipEncoder.from_pretrained(str(WORLD_CLIPS[name])) for name in WORLD_CLIPS], templates=WORLD_TEMPLATES, direction_loss="projection")
    factors = sample_factors(n, seed)
    source = render(factors)
    # name -> (contrast strength, dual ridge), as ExpansionConfig's nada_contrast / nada_dual_ridge
    modes = {"plain": (0.0, None), "centred": (1.0, None), **{f"dual {r:g}": (0.0, r) for r in ridges}}
    changes = []  # per CLIP: (A, N, D) image directions of the true renders
    with torch.no_grad():
        for encoder in guidance.encoders:
            source_features = encoder.encode_images(source)  # (N, D)
            per_attribute = []
            for attribute in attributes:
                per_attribute.append(encoder.encode_images(render(factors, attribute_labels(n, attribute))) - source_features)
            changes.append(torch.stack(per_attribute))
    results = {}
    for mode, (strength, ridge) in modes.items():
        # (A rendered, A domains), averaged over the ensemble as the NADA loss is
        pay = torch.stack([changes[c].mean(1) @ text_directions(guidance, encoder, attributes, strength, ridge).T for c, encoder in enumerate(guidance.encoders)]).mean(0)
        results[mode] = summarise(pay, attributes)
    return results


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = common.base_parser(NAME, __doc__)
    parser.add_argument("--attributes", nargs="+", default=None, choices=ATTRIBUTES, metavar="ATTRIBUTE", help="default: the domains of recipes/world-nada-10.yaml")
    parser.add_argument("--ridges", nargs="+", type=float, default=list(DEFAULT_RIDGES), help="dual-basis ridges to measure (default: %(default)s)")
    args = parser.parse_args(argv)
    out = common.setup(args)
    n = args.eval_samples or (8 if args.smoke else 256)
    attributes = args.attributes or recipe_attributes()
    modes = measure(n, args.eval_seed, attributes, args.ridges)
    results = {"benchmark": NAME, "environment": common.environment(args), "settings": {"portraits": n, "seed": args.eval_seed, "attributes": attributes, "clips": list(WORLD_CLIPS)}, "modes": modes}
    common.write_results(out, results)
    print(f"\n## What NADA pays for each attribute along each domain's text direction ({n} portraits, mean of {len(WORLD_CLIPS)} world CLIPs)\n")
    headers = ["text directions", "own attribute: mean / min", "another's: mean positive"] + [f"{a}: worst leak" for a in attributes]
    table = [[mode, f"{r['diagonal_mean']:.2f} / {r['diagonal_min']:.2f}", f"{r['off_diagonal_positive_mean']:.3f}"]
             + [f"{r['worst_leak'][a]['ratio']:.2f} ({r['worst_leak'][a]['attribute']})" for a in attributes] for mode, r in modes.items()]
    print(common.markdown_table(headers, table))
    print(f"\nresults: {out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
