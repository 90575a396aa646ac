"""Can a negative prompt tell a domain's attribute from the look-alike it must not draw?

A NADA domain is paid for its image direction's projection on its text direction; a look-alike
attribute of the world (sunglasses for an eyepatch) projects there too, so a domain can converge to
the look-alike (measured: the dec07 K13 run's eyepatch drew dark patches over both eyes, read as
sunglasses in 100% of samples). A negative prompt adds a hinge on the direction from the source
prompt to the negative prompt, minus its component along the domain's own direction
(``expander.losses.loss_nada_negative``).

For each (domain attribute, look-alike) pair, N source portraits are rendered with either attribute
and each world CLIP's image directions (CLIP(render) - CLIP(source portrait)) are measured: the
projection NADA pays for (``own``: on the plain text direction; ``dual``: on the direction the
ten-domain recipes reward, the dual basis at ridge 0.3 among their ten prompts), the negative
prompt's hinge (``hinge``), and the net pay of a domain with ``lambda_nada`` 1.5 and
``lambda_nada_negative`` 1.0 (the K14 recipe's eyepatch) on the dual direction. The negative prompt
separates the two when the look-alike's net pay falls well below the attribute's.

    python benchmarks/negative_prompts.py               # 256 portraits per attribute (seconds)
    python benchmarks/negative_prompts.py --smoke       # what the test suite runs
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
from expander.losses import loss_nada_negative  # noqa: E402
from expander.world.clip import WORLD_CLIPS, WORLD_TEMPLATES  # noqa: E402
from expander.world.renderer import ATTRIBUTES, attribute_labels, render, sample_factors  # noqa: E402

NAME = "negative_prompts"
# (domain attribute, look-alike it must not draw): eyepatch -> sunglasses was measured in training
# (K13); the others are pairs whose text directions the world CLIPs also find close.
PAIRS = (("eyepatch", "sunglasses"), ("glasses", "sunglasses"), ("beard", "moustache"), ("crown", "hat"), ("blue_skin", "zombie"))
LAMBDA_NADA, LAMBDA_NEGATIVE = 1.5, 1.0
# The domains and text directions of the ten-domain recipes (recipes/world-nada-10.yaml, the dec07/dec08 K runs).
RECIPE_DOMAINS = ("glasses", "zombie", "beard", "hat", "crown", "clown_nose", "eyepatch", "blue_skin", "freckles", "pop_art")
DUAL_RIDGE = 0.3


def measure(n: int, seed: int, pairs: Sequence[tuple[str, str]]) -> list[dict]:
    # As build_guidance makes it for world models: the projection loss, so directions are not normalised.
    guidance = ClipGuidance([ClipEncoder.from_pretrained(str(WORLD_CLIPS[name])) for name in WORLD_CLIPS], templates=WORLD_TEMPLATES, direction_loss="projection")
    # One guidance per CLIP as well, for its own hinge; built once, so its text directions are encoded once.
    singles = [ClipGuidance([encoder], templates=WORLD_TEMPLATES, direction_loss="projection") for encoder in guidance.encoders]
    factors = sample_factors(n, seed)
    source = render(factors)
    rows = []
    with torch.no_grad():
        source_features = [encoder.encode_images(source) for encoder in guidance.encoders]  # per CLIP: (N, D)
        renders = {attribute: render(factors, attribute_labels(n, attribute)) for attribute in dict.fromkeys(a for pair in pairs for a in pair)}
        for attribute, lookalike in pairs:
            prompt, negative = common.PROMPTS[attribute], common.PROMPTS[lookalike]
            row = {"attribute": attribute, "negative": lookalike}
            others = [common.PROMPTS[d] for d in RECIPE_DOMAINS if d != attribute]
            for name, encoder, single, features in zip(WORLD_CLIPS, guidance.encoders, singles, source_features):
                text = guidance.text_direction(encoder, common.SOURCE_PROMPT, prompt)  # (D,)
                dual = guidance.text_direction(encoder, common.SOURCE_PROMPT, prompt, others, 0.0, DUAL_RIDGE)  # (D,)
                row[f"{name}_text_cosine"] = float(text @ guidance.text_direction(encoder, common.SOURCE_PROMPT, negative))
                for kind, drawn in (("true", attribute), ("lookalike", lookalike)):
                    direction = encoder.encode_images(renders[drawn]) - features  # (N, D)
                    own, own_dual = float((direction @ text).mean()), float((direction @ dual).mean())
                    hinge = float(loss_nada_negative(single, [direction], common.SOURCE_PROMPT, prompt, [negative]))
                    row[f"{name}_{kind}_own"], row[f"{name}_{kind}_dual"], row[f"{name}_{kind}_hinge"] = own, own_dual, hinge
                    row[f"{name}_{kind}_net"] = LAMBDA_NADA * own_dual - LAMBDA_NEGATIVE * hinge
            rows.append(row)
    return rows


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = common.base_parser(NAME, __doc__)
    parser.add_argument("--pairs", nargs="+", default=[f"{a}:{b}" for a, b in PAIRS], metavar="ATTRIBUTE:NEGATIVE", help="domain attribute and look-alike, e.g. eyepatch:sunglasses")
    args = parser.parse_args(argv)
    pairs = [tuple(p.split(":", 1)) for p in args.pairs]
    unknown = sorted({a for pair in pairs for a in pair} - set(ATTRIBUTES))
    if unknown or any(len(p) != 2 for p in pairs):
        parser.error(f"--pairs takes ATTRIBUTE:NEGATIVE of the world's attributes {list(ATTRIBUTES)}; unknown: {unknown}")
    out = common.setup(args)
    n = args.eval_samples or (8 if args.smoke else 256)
    rows = measure(n, args.eval_seed, pairs[:2] if args.smoke else pairs)
    results = {"benchmark": NAME, "environment": common.environment(args), "settings": {"portraits": n, "seed": args.eval_seed, "lambda_nada": LAMBDA_NADA, "lambda_nada_negative": LAMBDA_NEGATIVE}, "rows": rows}
    common.write_results(out, results)
    clips = list(WORLD_CLIPS)
    headers = ["attribute / negative"] + [f"{c}: text cos; own; dual; hinge; net (each true / look-alike)" for c in clips]
    pair = lambda r, c, what: f"{r[f'{c}_true_{what}']:.2f} / {r[f'{c}_lookalike_{what}']:.2f}"  # noqa: E731
    table = [[f"{r['attribute']} / {r['negative']}"] + [f"{r[f'{c}_text_cosine']:.2f}; " + "; ".join(pair(r, c, what) for what in ("own", "dual", "hinge", "net")) for c in clips] for r in rows]
    print(f"\n## NADA pay of an attribute and its look-alike, with the look-alike as negative prompt ({n} portraits each; net = {LAMBDA_NADA} dual - {LAMBDA_NEGATIVE} hinge)\n")
    print(common.markdown_table(headers, table))
    print(f"\nresults: {out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
