"""The paper's analysis figures, measured exactly in the portraits world.

* ``dormancy`` (Fig. 12): mean perceptual change per SeFA direction, from the checkpoint's
  ``basis.dormancy`` when it was measured, else ``expander.subspace.dormancy.dormancy_curve`` with
  the world perceptual network; with the singular values and the dormant set the model reserves.
* ``joint`` (Fig. 7a): domain success of one domain (the paper's "sketch"; here a hat by default:
  in the world NADA cannot teach "sketch" at all, 0% even when adapting the whole generator, see
  ``expansion_vs_adaptation.py``) vs. training step, trained alone and
  together with 5 / 10 other domains (``--joint``), with ``ExpansionConfig``'s fixed
  ``domains_per_step``; plus that attribute's rate in a companion domain's subspace (the paper's
  "Sumo" curve: it should stay flat, the domains do not interfere).
* ``composition`` (Fig. 9): starting from domain A at full strength, domain B is introduced
  gradually (strength t in [0, 1]): rates of A, of B and of both on the same latents. Baseline:
  StyleGAN-NADA's weight interpolation between two adapted generators, (1 - t) G_A + t G_B, which
  the paper shows trades one domain for the other. Ours uses the smallest joint model holding both
  domains (else a dedicated two-domain expansion).
* ``alpha`` (Fig. 17): the same domain expanded with alpha = m x the model's alpha for several
  multipliers m (``--alphas``): success curve, final success, base FD (source preservation), domain
  FD (to renders with the attribute) and perceptual change base -> domain.
* ``direction`` (Fig. 14): the same domain on three dormant directions (the most dormant, the middle
  and the least dormant free one), plus, as a control, the most *significant* direction (forced):
  the dormant choices should give similar success curves, the control a worse base FD.

Success = fraction of a domain's samples that the world classifier labels with the attribute.
Curves use ``--curve-samples`` fixed latents every ``--eval-every`` steps; final numbers come from
``expander.world.metrics.evaluate`` (``--eval-samples``).

All training is NADA + replay (no GAN loss), like the other benchmarks.

Run (about 25-35 min on 2 CPU cores with the 64 px world parent: 3 joint runs of 300 steps, 9
one-domain runs of 200 steps at about 0.45-0.6 s a step, 2 NADA adaptations, the dormancy curve
and the measurements; estimated from measured per-step costs)::

    python benchmarks/paper_figures.py
    python benchmarks/paper_figures.py --figures dormancy alpha --alphas 0.5 1 2
    python benchmarks/paper_figures.py --smoke          # seconds; what the tests run

Writes ``results.json`` and one PNG per figure (``fig12_dormancy.png``, ``fig7a_joint.png``,
``fig9_composition.png``, ``fig17_alpha.png``, ``fig14_direction.png``) to ``--out``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from expander.train import Expander  # noqa: E402

NAME = "paper_figures"
FIGURES = ("dormancy", "joint", "composition", "alpha", "direction")


def parse(argv: Optional[Sequence[str]] = None):
    parser = common.base_parser(NAME, __doc__)
    parser.add_argument("--figures", nargs="+", choices=FIGURES, default=list(FIGURES))
    parser.add_argument("--steps", type=int, default=300, help="steps of the joint (Fig. 7a) runs (default: %(default)s)")
    parser.add_argument("--single-steps", type=int, default=200, help="steps of the one-domain runs (alpha, direction) and of the NADA adaptations (default: %(default)s)")
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--curve-samples", type=int, default=64, help="samples per point of a success curve (default: %(default)s)")
    parser.add_argument("--domain", default="hat", help="the domain of the joint and direction figures (default: %(default)s)")
    parser.add_argument("--joint", type=int, nargs="+", default=[0, 5, 10], help="numbers of other domains trained with it (default: %(default)s)")
    parser.add_argument("--pair", nargs=2, default=["glasses", "beard"], help="domains A B of the composition figure (default: %(default)s)")
    parser.add_argument("--interpolation-points", type=int, default=6)
    parser.add_argument("--alpha-domain", default="glasses", help="the domain of the alpha figure (default: %(default)s)")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0, 4.0], help="multipliers of the model's alpha (default: %(default)s)")
    parser.add_argument("--no-control", action="store_true", help="direction figure: skip the non-dormant control direction")
    parser.add_argument("--dormancy-samples", type=int, default=8, help="latents per direction when the curve is computed (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.single_steps, args.eval_every, args.curve_samples = 2, 2, 1, 8
        args.joint, args.alphas, args.interpolation_points, args.dormancy_samples = [0, 2], [0.5, 1.0], 3, 1
    args.eval_samples = args.eval_samples or (8 if args.smoke else 128)
    for name in [args.domain, args.alpha_domain, *args.pair]:
        if name not in common.PROMPTS:
            parser.error(f"{name!r} is not a world attribute; choose from {list(common.PROMPTS)}")
    if args.domain in args.pair or args.pair[0] == args.pair[1]:
        parser.error("--pair needs two different domains, neither of them --domain")
    return args


class Context:
    def __init__(self, args, parent, guidance, meter):
        self.args, self.parent, self.guidance, self.meter = args, parent, guidance, meter
        self.joint_models: dict[int, tuple] = {}  # others -> (model, specs)


def train_with_curve(ctx: Context, specs: list, steps: int, tracks: dict[str, tuple[str, str]], directions: Optional[dict[str, int]] = None, alpha: Optional[float] = None, force: bool = False):
    """Expand a fresh parent copy with ``specs``; every ``eval_every`` steps measure ``tracks``:
    {label: (domain, attribute)} -> rate of ``attribute`` on ``domain``'s samples. Returns (model, curve, seconds)."""
    args, meter = ctx.args, ctx.meter
    model = common.fresh_copy(ctx.parent)
    domains = [model.add_domain(s.domain(direction=(directions or {}).get(s.name, -1), alpha=alpha), force=force) for s in specs]
    trainer = Expander(model, domains, ctx.guidance, common.expansion_config(args, steps))
    curve: list[dict] = []

    def measure() -> None:
        point = {"step": trainer.step_index}
        for label, (domain, attribute) in tracks.items():
            point[label] = meter.rates(meter.images(model, {domain: 1.0}, args.curve_samples))[attribute]
        curve.append(point)

    measure()
    seconds = 0.0
    from tqdm.auto import tqdm

    for _ in tqdm(range(steps), disable=not args.progress, desc=",".join(s.name for s in specs)[:30], leave=False):
        with common.Stopwatch() as clock:
            trainer.step()
        seconds += clock.seconds
        if trainer.step_index % args.eval_every == 0 or trainer.step_index == steps:
            measure()
    return trainer.finish(), curve, seconds


# ---- Fig. 12 -----------------------------------------------------------------------------------


def fig_dormancy(ctx: Context) -> dict:
    model, basis = ctx.parent, ctx.parent.basis
    if basis.dormancy.numel() == basis.style_dim:
        curve, source = basis.dormancy.clone(), "checkpoint basis.dormancy"
    else:
        from expander.subspace.dormancy import dormancy_curve

        curve = dormancy_curve(model.generator, basis, ctx.meter.perceptual, n_samples=ctx.args.dormancy_samples, progress=ctx.args.progress)
        source = f"dormancy_curve (world perceptual, {ctx.args.dormancy_samples} latents per direction)"
    dormant = model.dormant_directions()
    active = [k for k in range(basis.style_dim) if k not in set(dormant)]
    mean_dormant = float(curve[dormant].mean())
    mean_active = float(curve[active].mean()) if active else None
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(range(basis.style_dim), curve.tolist(), lw=1.2, label="perceptual change")
    ax.scatter(dormant, curve[dormant].tolist(), s=8, color="C3", label=f"reserved dormant ({len(dormant)})", zorder=3)
    ax.set(xlabel="SeFA direction (decreasing singular value)", ylabel="mean perceptual change", title="dormancy curve (Fig. 12)")
    twin = ax.twinx()
    twin.semilogy(range(basis.style_dim), basis.singular_values.clamp(min=1e-12).tolist(), color="grey", lw=0.8, ls="--")
    twin.set_ylabel("singular value", color="grey")
    ax.legend(fontsize=8)
    common.save_figure(fig, ctx.out / "fig12_dormancy.png")
    return {"source": source, "curve": curve.tolist(), "singular_values": basis.singular_values.tolist(), "dormant_directions": dormant,
            "mean_change_dormant": mean_dormant, "mean_change_active": mean_active,
            "dormant_to_active_ratio": (mean_dormant / mean_active) if mean_active else None}


# ---- Fig. 7a -----------------------------------------------------------------------------------


def joint_specs(args, others: int) -> list:
    pool = list(args.pair) + [a for a in common.DOMAIN_ORDER if a not in (args.domain, *args.pair)]
    if others > len(pool):
        raise SystemExit(f"--joint {others}: at most {len(pool)} other world domains")
    return common.domain_specs(others + 1, [args.domain] + pool[:others])


def fig_joint(ctx: Context) -> dict:
    args = ctx.args
    runs = {}
    for others in args.joint:
        specs = joint_specs(args, others)
        tracks = {"success": (args.domain, specs[0].attribute)}
        if others:
            tracks["companion_rate"] = (specs[1].name, specs[0].attribute)
        model, curve, seconds = train_with_curve(ctx, specs, args.steps, tracks)
        ctx.joint_models[others] = (model, specs)
        runs[str(others)] = {"domains": [s.name for s in specs], "companion": specs[1].name if others else None, "seconds": seconds,
                             "curve": curve, "final_success": curve[-1]["success"], "first_step_at_half": next((p["step"] for p in curve if p["success"] >= 0.5), None)}
        print(f"joint: {args.domain} + {others} others: success {curve[-1]['success']:.3f}", flush=True)
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for i, (others, run) in enumerate(runs.items()):
        steps = [p["step"] for p in run["curve"]]
        ax.plot(steps, [p["success"] for p in run["curve"]], "-", color=f"C{i}", label=f"{args.domain}, {others} others")
        if run["companion"]:
            ax.plot(steps, [p["companion_rate"] for p in run["curve"]], ":", color=f"C{i}", label=f"{args.domain} rate in '{run['companion']}' ({others} others)")
    ax.set(xlabel="training step", ylabel=f"'{args.domain}' rate", ylim=(0, 1.02), title="Fig. 7a: one domain among others")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    common.save_figure(fig, ctx.out / "fig7a_joint.png")
    return {"domain": args.domain, "runs": runs}


# ---- Fig. 9 ------------------------------------------------------------------------------------


def fig_composition(ctx: Context) -> dict:
    args, meter = ctx.args, ctx.meter
    first, second = args.pair
    holding = sorted(k for k, (m, _) in ctx.joint_models.items() if {first, second} <= set(m.domain_names))
    if holding:
        model, source = ctx.joint_models[holding[0]][0], f"joint model with {holding[0]} others"
    else:
        model, _, _ = train_with_curve(ctx, common.domain_specs(2, [first, second]), args.steps, {})
        source = "dedicated two-domain expansion"
    ts = torch.linspace(0, 1, args.interpolation_points).tolist()
    ours = [{"t": t, **meter.both_rate(meter.images(model, {first: 1.0, second: t}, args.curve_samples), first, second)} for t in ts]
    adapted = {}
    for name in (first, second):
        config = common.AdaptationConfig(steps=args.single_steps, batch_size=2 if args.smoke else 4, seed=args.seed)
        adapted[name] = common.NadaAdaptation(ctx.parent.generator, ctx.guidance.clip, common.PROMPTS[name], config).run(progress=args.progress)
    nada = []
    for t in ts:
        generator = common.interpolate_generators(adapted[first], adapted[second], t)
        nada.append({"t": t, **meter.both_rate(meter.generator_images(generator, args.curve_samples), first, second)})
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for ax, curve, title in ((axes[0], ours, f"ours: {first} + t * {second}"), (axes[1], nada, f"NADA weights: (1-t) G_{first} + t G_{second}")):
        ax.plot(ts, [p["first"] for p in curve], "o-", label=first)
        ax.plot(ts, [p["second"] for p in curve], "s-", label=second)
        ax.plot(ts, [p["both"] for p in curve], "^-", lw=2, label="both")
        ax.set(xlabel="t", title=title, ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("fraction of samples")
    common.save_figure(fig, ctx.out / "fig9_composition.png")
    print(f"composition: both at t=1: ours {ours[-1]['both']:.3f}, NADA interpolation max {max(p['both'] for p in nada):.3f}", flush=True)
    return {"pair": [first, second], "model": source, "ours": ours, "nada_interpolation": nada,
            "ours_both_at_1": ours[-1]["both"], "nada_max_both": max(p["both"] for p in nada)}


# ---- Fig. 17 and Fig. 14 ----------------------------------------------------------------------


def _single_run(ctx: Context, spec, direction: int, alpha: Optional[float], force: bool = False) -> dict:
    model, curve, seconds = train_with_curve(ctx, [spec], ctx.args.single_steps, {"success": (spec.name, spec.attribute)}, {spec.name: direction}, alpha, force)
    report = ctx.meter.report(model)
    return {
        "direction": direction, "alpha": model.domain_alpha(model.get_domain(spec.name)), "seconds": seconds, "curve": curve,
        "success": report["domain_success"][spec.name], "base_fid": report["source_preservation"]["fid"],
        "domain_fid": ctx.meter.fd(ctx.meter.images(model, {spec.name: 1.0}), spec.attribute),
        "perceptual": report["alignment"][spec.name]["perceptual"], "factors_preserved": report["alignment"][spec.name]["factors_preserved"],
    }


def _plot_curves(ctx: Context, runs: dict, label: str, title: str, filename: str) -> None:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for key, run in runs.items():
        axes[0].plot([p["step"] for p in run["curve"]], [p["success"] for p in run["curve"]], "o-", ms=3, label=f"{label} {key}".strip())
    axes[0].set(xlabel="training step", ylabel="domain success", ylim=(0, 1.02), title=title)
    axes[0].legend(fontsize=7)
    axes[0].grid(alpha=0.3)
    keys = list(runs)
    x = list(range(len(keys)))
    axes[1].bar([i - 0.2 for i in x], [runs[k]["base_fid"] or 0.0 for k in keys], width=0.4, color="C7", label="base FD (to source renders)")
    axes[1].bar([i + 0.2 for i in x], [runs[k]["domain_fid"] or 0.0 for k in keys], width=0.4, color="C1", label="domain FD (to renders with it)")
    if ctx.parent_fid is not None:
        axes[1].axhline(ctx.parent_fid, color="k", lw=1, ls=":", label="parent base FD")
    axes[1].set(xlabel=label, ylabel="Fréchet distance", title="base and domain FD")
    axes[1].set_xticks(x, [str(k).replace(": ", ":\n").replace(" (", "\n(") for k in keys], fontsize=7)
    axes[1].legend(fontsize=7)
    common.save_figure(fig, ctx.out / filename)


def fig_alpha(ctx: Context) -> dict:
    args = ctx.args
    spec = common.domain_specs(1, [args.alpha_domain])[0]
    direction = ctx.parent.free_directions()[0]
    runs = {}
    for m in args.alphas:
        runs[f"{m:g}x"] = {"multiplier": m, **_single_run(ctx, spec, direction, m * ctx.parent.alpha)}
        print(f"alpha {m:g}x: success {runs[f'{m:g}x']['success']}, base FD {runs[f'{m:g}x']['base_fid']}", flush=True)
    _plot_curves(ctx, runs, "alpha", f"Fig. 17: '{spec.name}' vs alpha (model alpha {ctx.parent.alpha:.3g})", "fig17_alpha.png")
    return {"domain": spec.name, "model_alpha": ctx.parent.alpha, "direction": direction, "runs": runs}


def fig_direction(ctx: Context) -> dict:
    args = ctx.args
    spec = common.domain_specs(1, [args.domain])[0]
    free = ctx.parent.free_directions()
    chosen = {"most dormant": free[0], "middle": free[len(free) // 2], "least dormant": free[-1]}
    runs = {}
    for label, direction in chosen.items():
        runs[f"{label} ({direction})"] = {"dormant": True, **_single_run(ctx, spec, direction, None)}
    if not args.no_control:
        significant = next(k for k in range(ctx.parent.basis.style_dim) if k not in ctx.parent.dormant_directions())
        runs[f"control: significant ({significant})"] = {"dormant": False, **_single_run(ctx, spec, significant, None, force=True)}
    for key, run in runs.items():
        print(f"direction {key}: success {run['success']}, base FD {run['base_fid']}", flush=True)
    _plot_curves(ctx, runs, "", f"Fig. 14: '{spec.name}' on different directions", "fig14_direction.png")
    dormant = [r["success"] for r in runs.values() if r["dormant"] and r["success"] is not None]
    return {"domain": spec.name, "runs": runs, "dormant_success_spread": (max(dormant) - min(dormant)) if dormant else None}


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse(argv)
    out = common.setup(args)
    parent = common.load_parent(args)
    meter = common.WorldMeter(args.eval_samples, args.eval_seed)
    needs_training = set(args.figures) - {"dormancy"}
    guidance = common.nada_guidance(parent) if needs_training else None
    ctx = Context(args, parent, guidance, meter)
    ctx.out = out
    ctx.parent_fid = meter.report(parent)["source_preservation"]["fid"] if needs_training else None
    figures: dict[str, dict] = {}
    for name in FIGURES:  # fixed order: composition reuses the joint models
        if name in args.figures:
            with common.Stopwatch() as clock:
                figures[name] = globals()[f"fig_{name}"](ctx)
            figures[name]["wall_seconds"] = clock.seconds
    results = {"benchmark": NAME, "environment": common.environment(args), "parent_fid": ctx.parent_fid,
               "settings": {k: getattr(args, k) for k in ("steps", "single_steps", "eval_every", "curve_samples", "eval_samples", "seed", "eval_seed")},
               "figures": figures}
    common.write_results(out, results)
    print_tables(figures, args)
    print(f"\nresults: {out / 'results.json'}")
    return results


def print_tables(figures: dict, args) -> None:
    if "dormancy" in figures:
        d = figures["dormancy"]
        print("\n## Fig. 12: dormancy\n")
        print(common.markdown_table(["source", "dormant dirs", "mean change dormant", "mean change active", "ratio"],
                                    [[d["source"], len(d["dormant_directions"]), d["mean_change_dormant"], d["mean_change_active"], d["dormant_to_active_ratio"]]]))
    if "joint" in figures:
        print(f"\n## Fig. 7a: '{args.domain}' trained alone or with others\n")
        rows = [[others, r["final_success"], r["first_step_at_half"], r["curve"][-1].get("companion_rate"), r["seconds"]] for others, r in figures["joint"]["runs"].items()]
        print(common.markdown_table(["others", "final success", "first step >= 0.5", "rate in companion", "train s"], rows))
    if "composition" in figures:
        c = figures["composition"]
        print(f"\n## Fig. 9: composition {c['pair'][0]} + t * {c['pair'][1]} (ours) vs NADA weight interpolation\n")
        rows = [[p["t"], p["first"], p["second"], p["both"], q["first"], q["second"], q["both"]] for p, q in zip(c["ours"], c["nada_interpolation"])]
        print(common.markdown_table(["t", "ours A", "ours B", "ours both", "NADA A", "NADA B", "NADA both"], rows))
    for name, title in (("alpha", "Fig. 17: effect of alpha"), ("direction", "Fig. 14: choice of direction")):
        if name in figures:
            print(f"\n## {title} ('{figures[name]['domain']}')\n")
            rows = [[k, r["direction"], r["alpha"], r["success"], r["base_fid"], r["domain_fid"], r["perceptual"], r["seconds"]] for k, r in figures[name]["runs"].items()]
            print(common.markdown_table(["run", "direction", "alpha", "success", "base FD", "domain FD", "perceptual", "train s"], rows))


if __name__ == "__main__":
    main()
