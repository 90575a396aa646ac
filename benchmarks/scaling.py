"""How expansion scales with the number of domains: time per step and steps to 90% domain success.

For each N in ``--domains`` (default 1 5 10 20) a fresh copy of the parent is expanded with N world
domains (the 17 world attributes, then paraphrased repeats such as ``hat-2``; see
``common.domain_specs``) by ``expander.train.Expander`` with its default fixed ``domains_per_step``
(4): a step costs the same whatever N, so the time per step should be flat in N while the steps
needed grow (each domain is trained on ``min(N, 4) / N`` of the steps; the paper, appendix D.1,
reports a roughly linear growth of the iterations needed).

Every ``--eval-every`` steps the domain success of every domain (fraction of its samples that the
world classifier labels with its attribute, ``--eval-samples`` samples from fixed latents) is
measured; ``steps_to_target`` is the first measured step where the *mean* success over the N
domains reaches ``--target`` (0.9), ``steps_to_target_all`` the first where *every* domain does.
A run stops once every domain has reached the target (unless ``--no-early-stop``) or at
``--max-steps``. Time per step is the median
wall time of the training steps alone (the measurements are not counted). A final
``metrics.evaluate`` report (no composition pairs) gives base FD and leakage at the end.

Run (at most about 20-30 min on 2 CPU cores with the 64 px world parent: 4 x 500 steps at about
0.45-0.6 s plus the curves; less when the target is reached early; estimated from measured
per-step costs)::

    python benchmarks/scaling.py
    python benchmarks/scaling.py --domains 1 5 --max-steps 300 --eval-every 20
    python benchmarks/scaling.py --smoke          # seconds; what the tests run

Writes ``results.json``, ``success_curves.png`` and ``scaling.png`` to ``--out``.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from expander.train import Expander  # noqa: E402

NAME = "scaling"


def parse(argv: Optional[Sequence[str]] = None):
    parser = common.base_parser(NAME, __doc__)
    parser.add_argument("--domains", type=int, nargs="+", default=[1, 5, 10, 20], help="numbers of domains N (default: %(default)s)")
    parser.add_argument("--names", nargs="+", default=None, help="world attributes to draw the domains from, in order")
    parser.add_argument("--max-steps", type=int, default=500, help="steps per N at most (default: %(default)s)")
    parser.add_argument("--eval-every", type=int, default=25, help="measure domain success every K steps (default: %(default)s)")
    parser.add_argument("--target", type=float, default=0.9, help="domain success to reach (default: %(default)s)")
    parser.add_argument("--domains-per-step", type=int, default=4, help="domains trained per step (default: %(default)s, ExpansionConfig's)")
    parser.add_argument("--no-early-stop", action="store_true", help="train every N for --max-steps")
    args = parser.parse_args(argv)
    if args.smoke:
        args.domains, args.max_steps, args.eval_every, args.domains_per_step = [1, 3], 4, 2, 2
    args.eval_samples = args.eval_samples or (8 if args.smoke else 32)
    return args


def first_step(curve: list[dict], key: str, target: float) -> Optional[int]:
    for point in curve:
        if point[key] >= target:
            return point["step"]
    return None


def run_one(args, parent, guidance, meter, n: int) -> dict:
    specs = common.domain_specs(n, args.names)
    model = common.fresh_copy(parent)
    domains = common.add_domains(model, specs)
    attribute_of = {s.name: s.attribute for s in specs}
    trainer = Expander(model, domains, guidance, common.expansion_config(args, args.max_steps, domains_per_step=args.domains_per_step))
    step_seconds, curve = [], []

    def measure() -> dict:
        success = meter.success(model, attribute_of)
        values = list(success.values())
        point = {"step": trainer.step_index, "mean_success": sum(values) / n, "min_success": min(values), "success": success}
        curve.append(point)
        return point

    point = measure()
    from tqdm.auto import tqdm

    bar = tqdm(total=args.max_steps, disable=not args.progress, desc=f"N={n}")
    while trainer.step_index < args.max_steps:
        start = time.perf_counter()
        trainer.step()
        step_seconds.append(time.perf_counter() - start)
        bar.update(1)
        if trainer.step_index % args.eval_every == 0 or trainer.step_index == args.max_steps:
            point = measure()
            bar.set_postfix(mean=f"{point['mean_success']:.2f}", min=f"{point['min_success']:.2f}")
            if not args.no_early_stop and point["min_success"] >= args.target:
                break
    bar.close()
    trainer.finish()
    report = meter.report(model, attribute_of=common.attribute_map(specs), n_samples=max(args.eval_samples, 64 if not args.smoke else 8))
    timed = step_seconds[1:] or step_seconds  # the first step pays one-off set-up costs
    return {
        "n_domains": n, "domains": [s.name for s in specs], "steps_run": trainer.step_index,
        "seconds_per_step": statistics.median(timed), "seconds_per_step_mean": sum(timed) / len(timed), "training_seconds": sum(step_seconds),
        "steps_to_target": first_step(curve, "mean_success", args.target), "steps_to_target_all": first_step(curve, "min_success", args.target),
        "final_mean_success": curve[-1]["mean_success"], "final_min_success": curve[-1]["min_success"], "curve": curve,
        "final_report": common.summary_of(report),
    }


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse(argv)
    out = common.setup(args)
    parent = common.load_parent(args)
    if max(args.domains) > len(parent.free_directions()):
        raise SystemExit(f"N={max(args.domains)} needs that many free dormant directions; the parent has {len(parent.free_directions())}")
    guidance = common.nada_guidance(parent)
    meter = common.WorldMeter(args.eval_samples, args.eval_seed)
    rows = []
    for n in args.domains:
        rows.append(run_one(args, parent, guidance, meter, n))
        r = rows[-1]
        print(f"N={n}: {r['seconds_per_step']:.3f} s/step, steps to {args.target:.0%}: {r['steps_to_target']}", flush=True)
    results = {
        "benchmark": NAME, "environment": common.environment(args),
        "settings": {"max_steps": args.max_steps, "eval_every": args.eval_every, "eval_samples": args.eval_samples, "target": args.target,
                     "domains_per_step": args.domains_per_step, "early_stop": not args.no_early_stop, "seed": args.seed, "eval_seed": args.eval_seed},
        "rows": rows,
    }
    common.write_results(out, results)
    plot(rows, args.target, out)
    headers = ["N", "s/step", "steps run", f"steps to mean {args.target:.0%}", f"steps to all {args.target:.0%}", "final mean success", "final min success", "base FD", "leakage"]
    table = [[r["n_domains"], r["seconds_per_step"], r["steps_run"], r["steps_to_target"], r["steps_to_target_all"], r["final_mean_success"],
              r["final_min_success"], r["final_report"]["base_fid"], r["final_report"]["mean_leakage"]] for r in rows]
    print(f"\n## Scaling with the number of domains ({args.domains_per_step} domains per step; '-' = target not reached in {args.max_steps} steps)\n")
    print(common.markdown_table(headers, table))
    print(f"\nresults: {out / 'results.json'}")
    return results


def plot(rows: list[dict], target: float, out: Path) -> None:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for r in rows:
        ax.plot([p["step"] for p in r["curve"]], [p["mean_success"] for p in r["curve"]], "o-", ms=3, label=f"N={r['n_domains']}")
    ax.axhline(target, color="grey", lw=1, ls=":")
    ax.set(xlabel="training step", ylabel="mean domain success", ylim=(0, 1.02), title="domain success while expanding")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    common.save_figure(fig, out / "success_curves.png")

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    ns = [r["n_domains"] for r in rows]
    axes[0].plot(ns, [r["seconds_per_step"] for r in rows], "o-")
    axes[0].set(xlabel="domains N", ylabel="seconds per step (median)", title="time per step", ylim=(0, None))
    reached = [(r["n_domains"], r["steps_to_target"]) for r in rows if r["steps_to_target"] is not None]
    missed = [(r["n_domains"], r["steps_run"]) for r in rows if r["steps_to_target"] is None]
    if reached:
        axes[1].plot(*zip(*reached), "o-", label=f"mean success >= {target:.0%}")
    if missed:
        axes[1].plot(*zip(*missed), "x", color="red", label="not reached (steps run)")
    axes[1].set(xlabel="domains N", ylabel="steps", title="steps to target", ylim=(0, None))
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    common.save_figure(fig, out / "scaling.png")


if __name__ == "__main__":
    main()
