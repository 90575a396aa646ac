"""Step cost of training settings: a recipe's expansion step with and without chosen settings, side by side.

Two trainers (``expander.train.Expander``) are built on two copies of the recipe's parent with the
recipe's domains and guidance: ``recipe`` with the recipe's training settings, ``variant`` with
``--set KEY=VALUE`` on top (default: ``lambda_composed_edits=0``, i.e. what the composed-edits loss
of ``recipes/world-nada-10-compose.yaml`` costs). Their steps alternate in one process (recipe,
variant, recipe, ...), so both see the same load on a shared machine and the *ratio* of the median
step times is what to read; absolute times move with the machine.

    python benchmarks/step_cost.py                                         # compose recipe, 20 steps each
    python benchmarks/step_cost.py --recipe recipes/world-nada-10.yaml --set lambda_nada_consistency=0
    python benchmarks/step_cost.py --smoke                                 # seconds; what the tests run

Prints a table; writes ``results.json`` to ``--out``.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from expander.cli import _training_settings  # noqa: E402
from expander.guidance.build import build_guidance  # noqa: E402
from expander.recipes import Recipe  # noqa: E402
from expander.train import Expander  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def parse(argv: Optional[Sequence[str]] = None):
    parser = common.base_parser("step_cost", __doc__)
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "world-nada-10-compose.yaml"), help="recipe whose step is timed (default: %(default)s)")
    parser.add_argument("--set", dest="settings", action="append", default=None, metavar="KEY=VALUE", help="the variant's training settings on top of the recipe's (repeatable; default: lambda_composed_edits=0)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per trainer (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per trainer first (default: %(default)s)")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse(argv)
    out = common.setup(args)
    recipe = Recipe.load(args.recipe)
    overrides = _training_settings(tuple(args.settings or ["lambda_composed_edits=0"]))
    config = recipe.training
    if args.smoke:  # tiny batches, as every benchmark's smoke mode
        config = replace(config, batch_size=3, base_batch_size=2)
    variant = config.with_settings(overrides)

    if args.model is None and not args.smoke:
        args.model = recipe.model
    parent = common.load_parent(args)
    for domain in recipe.domains:
        parent.add_domain(replace(domain))
    guidance = build_guidance(parent, sorted({d.method for d in recipe.domains}), recipe.guidance, config)
    trainers = {}
    for name, settings in (("recipe", config), ("variant", variant)):
        model = common.fresh_copy(parent)
        trainers[name] = Expander(model, [model.get_domain(d.name) for d in recipe.domains], guidance, settings)

    times: dict[str, list[float]] = {name: [] for name in trainers}
    for index in range(args.warmup + args.steps):
        for name, trainer in trainers.items():  # alternate: both see the same machine load
            start = time.perf_counter()
            trainer.step()
            if index >= args.warmup:
                times[name].append(time.perf_counter() - start)

    median = {name: statistics.median(values) for name, values in times.items()}
    results = {
        "environment": common.environment(args),
        "recipe": str(args.recipe),
        "variant_settings": overrides,
        "steps": args.steps,
        "median_step_s": median,
        "step_s": times,
        "ratio_recipe_over_variant": median["recipe"] / median["variant"],
    }
    common.write_results(out, results)
    print(common.markdown_table(["trainer", "settings", "median s / step"], [
        ["recipe", Path(args.recipe).name, common.fmt(median["recipe"])],
        ["variant", ", ".join(f"{k}={v}" for k, v in overrides.items()), common.fmt(median["variant"])],
    ]))
    print(f"recipe / variant: {results['ratio_recipe_over_variant']:.2f}x ({args.steps} steps each, interleaved)")
    return results


if __name__ == "__main__":
    main()
