"""One expanded generator vs. N domain-adapted generators: wall time, checkpoint bytes, quality.

For each N in ``--domains`` (default 1 5 10) the first N world domains (``--names``) are

* **expanded** jointly into one copy of the parent (``model.add_domain`` + ``build_guidance`` +
  ``expander.train.expand``: dormant directions, base-subspace replay), and
* **adapted** one by one, StyleGAN-NADA style (``common.NadaAdaptation``: the whole synthesis network
  of a fresh copy fine-tuned with the same NADA loss, no subspaces, no replay), one generator each.

Both use the same CLIP (the world's), prompts, learning rate and batch size, and every domain gets the
same number of adaptation-loss updates: ``--steps`` per adapted generator, and
``ceil(steps * N / min(N, domains_per_step))`` expansion steps (each step trains
``domains_per_step`` of the N domains). Each domain is adapted once and reused for every N that
includes it. Everything runs in one process, one after the other, so the ratios compare like with like.

Measured (world classifier, ``expander.world.metrics``; samples from the same seeded latents):

* time: training wall time (expansion, and the sum over the N adaptations), ratio expansion / adaptations;
* bytes: one expanded checkpoint (weights + basis + config + domains.json) vs N generator checkpoints;
* domain success: fraction of a domain's samples labelled with its attribute (expansion: the domain's
  repurposed subspace; adaptation: the adapted generator's samples);
* base FD: Fréchet distance (classifier features) of base samples to source renders. Expansion keeps
  the source domain in its base subspace; an adapted generator has lost it, so its FD is that of its
  (domain) samples to source renders. ``parent`` is the unexpanded parent's FD;
* domain FD: FD of domain samples to renders *with* the attribute (quality of the new domain).

No method gets a GAN loss (no real images are passed to ``expand``): the comparison is NADA (+ replay
for expansion) only.

Run (about 20-30 min on 2 CPU cores with the 64 px world parent: 1425 expansion steps at about
0.45-0.6 s, 3000 adaptation steps at about 0.1 s, plus the measurements; estimated from measured
per-step costs, not from a timed full run)::

    python benchmarks/expansion_vs_adaptation.py
    python benchmarks/expansion_vs_adaptation.py --domains 1 5 --steps 150 --out runs/bench/eva-short
    python benchmarks/expansion_vs_adaptation.py --smoke          # seconds; what the tests run

Writes ``results.json``, ``time_bytes.png`` and ``quality.png`` to ``--out``.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Optional, Sequence

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from expander.train import expand  # noqa: E402

NAME = "expansion_vs_adaptation"


def parse(argv: Optional[Sequence[str]] = None):
    parser = common.base_parser(NAME, __doc__)
    parser.add_argument("--domains", type=int, nargs="+", default=[1, 5, 10], help="numbers of domains N (default: %(default)s)")
    parser.add_argument("--names", nargs="+", default=None, help=f"world attributes to draw the domains from, in order (default: {' '.join(common.DOMAIN_ORDER[:10])} ...)")
    parser.add_argument("--steps", type=int, default=300, help="adaptation steps per domain (default: %(default)s)")
    parser.add_argument("--domains-per-step", type=int, default=4, help="expansion: domains trained per step (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.domains, args.steps, args.domains_per_step = [1, 2], 2, 2
    args.eval_samples = args.eval_samples or (8 if args.smoke else 128)
    return args


def expansion_steps(steps: int, n: int, domains_per_step: int) -> int:
    """Steps that give each of ``n`` domains ``steps`` adaptation-loss updates in expectation."""
    return math.ceil(steps * n / min(n, domains_per_step))


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse(argv)
    out = common.setup(args)
    parent = common.load_parent(args)
    guidance = common.nada_guidance(parent)
    meter = common.WorldMeter(args.eval_samples, args.eval_seed)
    specs = common.domain_specs(max(args.domains), args.names)
    parent_fid = meter.report(parent)["source_preservation"]["fid"]

    # N separate adaptations (each domain once; reused by every N that includes it).
    adapted: dict[str, dict] = {}
    for spec in specs:
        config = common.AdaptationConfig(steps=args.steps, batch_size=2 if args.smoke else 4, seed=args.seed)
        with common.Stopwatch() as clock:
            generator = common.NadaAdaptation(parent.generator, guidance.clip, spec.prompt, config).run(progress=args.progress)
        report = meter.report(common.with_generator(parent, generator))
        images = meter.generator_images(generator)
        adapted[spec.name] = {
            "attribute": spec.attribute, "prompt": spec.prompt, "steps": args.steps, "seconds": clock.seconds,
            "bytes": common.generator_checkpoint_bytes(generator),
            "success": report["attribute_rates"]["base"][spec.attribute],
            "base_fid": report["source_preservation"]["fid"],
            "domain_fid": meter.fd(images, spec.attribute),
        }
        print(f"adapted {spec.name}: {clock.seconds:.1f} s, success {adapted[spec.name]['success']:.3f}", flush=True)

    rows = []
    for n in args.domains:
        chosen = specs[:n]
        model = common.fresh_copy(parent)
        domains = common.add_domains(model, chosen)
        steps = expansion_steps(args.steps, n, args.domains_per_step)
        config = common.expansion_config(args, steps, domains_per_step=args.domains_per_step)
        with common.Stopwatch() as clock:
            expand(model, domains, guidance, config, progress=args.progress)
        report = meter.report(model, attribute_of=common.attribute_map(chosen))
        domain_fids = {s.name: meter.fd(meter.images(model, {s.name: 1.0}), s.attribute) for s in chosen}
        expansion = {
            "steps": steps, "seconds": clock.seconds, "bytes": common.expanded_checkpoint_bytes(model),
            "success": report["domain_success"], "mean_success": report["summary"]["mean_success"],
            "base_fid": report["source_preservation"]["fid"], "fid_floor": report["source_preservation"]["fid_floor"],
            "domain_fid": domain_fids, "mean_domain_fid": sum(domain_fids.values()) / n,
            "mean_leakage": report["summary"]["mean_leakage"], "directions": {d.name: d.direction for d in domains},
        }
        group = [adapted[s.name] for s in chosen]
        adaptation = {
            "domains": [s.name for s in chosen], "steps_each": args.steps,
            "seconds": sum(a["seconds"] for a in group), "bytes": sum(a["bytes"] for a in group),
            "mean_success": sum(a["success"] for a in group) / n, "mean_base_fid": sum(a["base_fid"] for a in group) / n,
            "mean_domain_fid": sum(a["domain_fid"] for a in group) / n,
        }
        rows.append({
            "n_domains": n, "expansion": expansion, "adaptation": adaptation,
            "time_ratio": expansion["seconds"] / adaptation["seconds"], "bytes_ratio": expansion["bytes"] / adaptation["bytes"],
        })
        print(f"N={n}: expansion {clock.seconds:.1f} s, time ratio {rows[-1]['time_ratio']:.3f}", flush=True)

    results = {
        "benchmark": NAME, "environment": common.environment(args), "parent_fid": parent_fid,
        "settings": {"steps_per_domain": args.steps, "domains_per_step": args.domains_per_step, "eval_samples": args.eval_samples, "eval_seed": args.eval_seed, "seed": args.seed},
        "adapted": adapted, "rows": rows,
    }
    common.write_results(out, results)
    plot(rows, parent_fid, out)
    headers = ["N", "exp steps", "exp time s", "adapt time s", "time ratio", "exp MB", "adapt MB", "bytes ratio", "exp success", "adapt success", "exp base FD", "adapt base FD", "exp domain FD", "adapt domain FD"]
    table = [
        [r["n_domains"], r["expansion"]["steps"], r["expansion"]["seconds"], r["adaptation"]["seconds"], r["time_ratio"],
         r["expansion"]["bytes"] / 1e6, r["adaptation"]["bytes"] / 1e6, r["bytes_ratio"], r["expansion"]["mean_success"], r["adaptation"]["mean_success"],
         r["expansion"]["base_fid"], r["adaptation"]["mean_base_fid"], r["expansion"]["mean_domain_fid"], r["adaptation"]["mean_domain_fid"]]
        for r in rows
    ]
    print(f"\n## Expansion vs. adaptation (parent base FD {common.fmt(parent_fid)}; {args.steps} adaptation steps per domain)\n")
    print(common.markdown_table(headers, table))
    print(f"\nresults: {out / 'results.json'}")
    return results


def plot(rows: list[dict], parent_fid: Optional[float], out: Path) -> None:
    plt = common.pyplot()
    ns = [r["n_domains"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    axes[0].plot(ns, [r["expansion"]["seconds"] for r in rows], "o-", label="expansion (one generator)")
    axes[0].plot(ns, [r["adaptation"]["seconds"] for r in rows], "s--", label="adaptation (N generators)")
    axes[0].set(xlabel="domains N", ylabel="training wall time (s)", title="time")
    axes[1].plot(ns, [r["expansion"]["bytes"] / 1e6 for r in rows], "o-", label="expansion")
    axes[1].plot(ns, [r["adaptation"]["bytes"] / 1e6 for r in rows], "s--", label="adaptation")
    axes[1].set(xlabel="domains N", ylabel="checkpoint MB", title="storage")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    common.save_figure(fig, out / "time_bytes.png")

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    axes[0].plot(ns, [r["expansion"]["mean_success"] or 0.0 for r in rows], "o-", label="expansion")
    axes[0].plot(ns, [r["adaptation"]["mean_success"] for r in rows], "s--", label="adaptation")
    axes[0].set(xlabel="domains N", ylabel="mean domain success", ylim=(0, 1), title="domain success")
    axes[1].plot(ns, [r["expansion"]["base_fid"] for r in rows], "o-", label="expansion: base subspace")
    axes[1].plot(ns, [r["adaptation"]["mean_base_fid"] for r in rows], "s--", label="adaptation: its samples")
    if parent_fid is not None:
        axes[1].axhline(parent_fid, color="grey", lw=1, ls=":", label="parent")
    axes[1].set(xlabel="domains N", ylabel="FD to source renders", title="source preservation")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    common.save_figure(fig, out / "quality.png")


if __name__ == "__main__":
    main()
