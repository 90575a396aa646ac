"""Do the world CLIPs check *where* an attribute is drawn? (What NADA can and cannot be taught by them.)

For each local attribute of the portraits world (one that changes under a third of the pixels), N
source portraits are rendered with and without it; the *misplaced* image is the source portrait
with the attribute's pixels moved a quarter of the image vertically, towards the centre (a crown
painted over the eyes, a beard on the forehead). For each world CLIP the script prints the mean
projection of the image direction (CLIP(image) - CLIP(source portrait)) onto the attribute's NADA
text direction, which is what the NADA projection loss rewards, for the true and the misplaced
image; and the share of each that the world's evaluation classifier labels with the attribute.

A ratio misplaced / true near 1 means NADA with that CLIP pays as much for a misplaced attribute as
for the real one, while ``expander eval`` counts the misplaced one as a failure: such a domain can
converge to the wrong picture, and whether it does varies between runs.

    python benchmarks/clip_shortcuts.py                 # 256 portraits per attribute (about a minute)
    python benchmarks/clip_shortcuts.py --smoke         # seconds; what the test suite runs
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
from expander.world.classifier import load_world_classifier  # noqa: E402
from expander.world.clip import WORLD_CLIPS, WORLD_TEMPLATES  # noqa: E402
from expander.world.renderer import ATTRIBUTES, attribute_labels, attribute_mask, move_attribute, render, sample_factors  # noqa: E402

NAME = "clip_shortcuts"
LOCAL_AREA = 1 / 3  # attributes that change more of the image than this are whole-image styles: skipped
MIN_PROJECTION = 0.1  # below this the CLIP hardly sees the true attribute: no ratio


def misplace(source: torch.Tensor, with_attribute: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The attribute's pixels moved a quarter of the image vertically, towards the centre: (N, 3, R, R), and its area (N,)."""
    size = source.shape[-1]
    mask = attribute_mask(source, with_attribute)[:, 0]  # (N, R, R)
    rows = torch.arange(size, dtype=torch.float32)[:, None]  # (R, 1)
    centre_row = (mask * rows).sum((1, 2)) / mask.sum((1, 2)).clamp(min=1)  # (N,)
    shifts = [size // 4 if c < size / 2 else -(size // 4) for c in centre_row.tolist()]
    return move_attribute(source, with_attribute, shifts, [0] * len(shifts))


def measure(n: int, seed: int, attributes: Sequence[str]) -> list[dict]:
    guidance = ClipGuidance([ClipEncoder.from_pretrained(str(WORLD_CLIPS[name])) for name in WORLD_CLIPS], templates=WORLD_TEMPLATES)
    classifier = load_world_classifier()
    factors = sample_factors(n, seed)
    source = render(factors)
    rows = []
    with torch.no_grad():
        source_features = [encoder.encode_images(source) for encoder in guidance.encoders]  # per CLIP: (N, D)
        for attribute in attributes:
            true = render(factors, attribute_labels(n, attribute))
            misplaced, area = misplace(source, true)
            row = {"attribute": attribute, "area": float(area.mean())}
            if row["area"] > LOCAL_AREA:
                continue
            prompt = common.PROMPTS[attribute]
            for name, encoder, features in zip(WORLD_CLIPS, guidance.encoders, source_features):
                text = guidance.text_direction(encoder, common.SOURCE_PROMPT, prompt)  # (D,)
                for kind, images in (("true", true), ("misplaced", misplaced)):
                    row[f"{name}_{kind}"] = float(((encoder.encode_images(images) - features) @ text).mean())
                # No ratio where the CLIP does not see the attribute at all (elf ears, cat ears).
                row[f"{name}_ratio"] = row[f"{name}_misplaced"] / row[f"{name}_true"] if row[f"{name}_true"] > MIN_PROJECTION else None
            column = ATTRIBUTES.index(attribute)
            for kind, images in (("true", true), ("misplaced", misplaced)):
                row[f"classifier_{kind}"] = float((classifier.predict_attributes(images)[:, column] > 0.5).float().mean())
            rows.append(row)
    return rows


def _ratio(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = common.base_parser(NAME, __doc__)
    parser.add_argument("--attributes", nargs="+", default=list(ATTRIBUTES), choices=ATTRIBUTES, metavar="ATTRIBUTE")
    args = parser.parse_args(argv)
    out = common.setup(args)
    n = args.eval_samples or (8 if args.smoke else 256)
    attributes = args.attributes[:3] if args.smoke else args.attributes
    rows = measure(n, args.eval_seed, attributes)
    results = {"benchmark": NAME, "environment": common.environment(args), "settings": {"portraits": n, "seed": args.eval_seed}, "rows": rows}
    common.write_results(out, results)
    clips = list(WORLD_CLIPS)
    headers = ["attribute", "pixels"] + [f"{c}: true / misplaced (ratio)" for c in clips] + ["classifier: true / misplaced"]
    table = [[r["attribute"], f"{r['area']:.1%}"]
             + [f"{r[f'{c}_true']:.2f} / {r[f'{c}_misplaced']:.2f} ({_ratio(r[f'{c}_ratio'])})" for c in clips]
             + [f"{r['classifier_true']:.0%} / {r['classifier_misplaced']:.0%}"] for r in rows]
    print(f"\n## NADA projection of true vs misplaced attributes ({n} portraits each)\n")
    print(common.markdown_table(headers, table))
    print(f"\nresults: {out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
