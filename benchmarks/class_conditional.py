"""The paper's appendix-B baseline: domain expansion by class conditioning, vs. subspace expansion.

Appendix B of Nitzan et al. turns the unconditional generator into a class-conditional one (class 0
= the source domain, class k = new domain k) and trains it with the same losses: on class 0 the
replay loss against the frozen parent, on class k the domain's adaptation loss. It reports that the
classes "leak" into each other and are not aligned (the same latent gives a different person in
each class). This script measures both claims in the portraits world against our expansion.

Methods (same domains, prompts, NADA loss, replay weights, steps, batch sizes, learning rate and
seed; no GAN loss in any of them):

* ``ours``: ``expander.train.expand`` (dormant SeFA directions, base-subspace projection).
* ``z-concat`` (the paper's baseline, Karras et al. 2020's conditional StyleGAN2 mapping): a
  one-hot class vector goes through one learned linear layer (``embed``); its pixel-normalised
  output is concatenated to the pixel-normalised z and fed to the mapping network. Concatenation is
  implemented as extra input columns of the mapping's first layer, initialised to zero so that at
  step 0 every class reproduces the parent exactly. Trained: synthesis, mapping, embed. The class
  changes the whole mapping, so nothing ties a latent's images in different classes together.
  (Departure: the new columns use an equalised learning-rate multiplier of 1, not the mapping's
  0.01, so the class signal can be learnt in a few hundred CPU steps.)
* ``w-offset``: a learned per-class offset added to w (``w_k = mapping(z) + e_k``, ``e_0 = 0``;
  equivalently a one-hot concatenated to w followed by a linear layer back to W), initialised at
  the same distance alpha as our subspaces along a random direction. It is the ablation closest to
  ours: what is missing is only the subspace structure (no base projection, no dedicated dormant
  direction; the offset may use every direction of W).

For the baselines, composition (``metrics.evaluate``'s pairs) uses a multi-hot class vector
(z-concat) or the sum of the two offsets (w-offset), the natural analogues of adding two directions.

Measured with ``expander.world.metrics.evaluate`` (the baselines through a thin wrapper exposing
``domain_names``, ``random_latents``, ``domain_latents`` and ``generator.synthesis``; their
"latents" are z): domain success, leakage (off-diagonal attribute rates), false positives on base
samples, alignment (world-perceptual distance between a latent's base and domain images, and the
fraction of source factors unchanged), base FD, and composition.

Run (about 15-20 min on 2 CPU cores with the 64 px world parent: 3 x 500 steps at about 0.6 s plus
the measurements; estimated from measured per-step costs)::

    python benchmarks/class_conditional.py
    python benchmarks/class_conditional.py --names hat beard --steps 300 --methods ours z-concat
    python benchmarks/class_conditional.py --smoke          # seconds; what the tests run

Writes ``results.json``, ``metrics.png`` and ``leakage.png`` to ``--out``.
"""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from expander.generators.stylegan2 import EqualLinear, Generator, PixelNorm, fused_leaky_relu  # noqa: E402
from expander.losses import loss_nada, loss_replay  # noqa: E402
from expander.train import ExpansionConfig, expand  # noqa: E402

NAME = "class_conditional"
METHODS = ("ours", "z-concat", "w-offset")


# --------------------------------------------------------------------------------------------------
# The class-conditional baselines
# --------------------------------------------------------------------------------------------------


class ZConcatMapping(nn.Module):
    """Karras et al.'s conditional mapping: fc0([norm(z), norm(embed(c))]) then the remaining layers."""

    def __init__(self, mapping: nn.Sequential, num_classes: int):
        super().__init__()
        self.mapping = copy.deepcopy(mapping)
        first = self.mapping[1]
        dim_out, dim = first.weight.shape
        self.embed = EqualLinear(num_classes, dim)
        self.norm = PixelNorm()
        self.cond_weight = nn.Parameter(torch.zeros(dim_out, dim))  # fc0's columns for the embedding; 0 = the parent
        self.cond_scale = 1 / math.sqrt(dim)

    def forward(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        first = self.mapping[1]
        h = F.linear(self.norm(z), first.weight * first.scale) + F.linear(self.norm(self.embed(c)), self.cond_weight * self.cond_scale)
        h = fused_leaky_relu(h, first.bias * first.lr_mul)
        for layer in list(self.mapping)[2:]:
            h = layer(h)
        return h


class ClassConditional(nn.Module):
    """A class-conditional copy of the parent with the sampling interface ``metrics.evaluate`` uses.

    Its latents are z (``random_latents`` returns the same z as ``ExpandedGenerator.random_latents``
    for a seed); ``domain_latents(z, strengths)`` maps them to w for a class vector: class 0 (the
    source) when ``strengths`` is empty, else ``sum_k s_k onehot_k`` (+ the rest on class 0).
    """

    def __init__(self, parent: "common.ExpandedGenerator", names: Sequence[str], kind: str, seed: int = 0):
        super().__init__()
        if kind not in ("z-concat", "w-offset"):
            raise ValueError(f"unknown conditioning {kind!r}")
        self.kind, self.names = kind, list(names)
        self.generator: Generator = copy.deepcopy(parent.generator).eval().requires_grad_(False)
        self.style_dim = self.generator.style_dim
        if kind == "z-concat":
            torch.manual_seed(seed)
            self.cmapping = ZConcatMapping(self.generator.style, len(names) + 1)
        else:
            rng = torch.Generator().manual_seed(seed)
            directions = F.normalize(torch.randn(len(names), self.style_dim, generator=rng), dim=-1)
            self.offsets = nn.Parameter(directions * parent.alpha)

    @property
    def domain_names(self) -> list[str]:
        return list(self.names)

    def trainable_parameters(self) -> list[nn.Parameter]:
        extra = list(self.cmapping.parameters()) if self.kind == "z-concat" else [self.offsets]
        return self.generator.synthesis_parameters() + extra

    def random_latents(self, n: int, seed: int = 0) -> torch.Tensor:
        rng = torch.Generator().manual_seed(int(seed))
        return torch.randn(n, self.style_dim, generator=rng).to(self.generator.w_avg.device)

    def class_vector(self, n: int, strengths: dict[str, float]) -> torch.Tensor:
        c = torch.zeros(len(self.names) + 1, device=self.generator.w_avg.device)
        for name, s in strengths.items():
            if name != "base":
                c[1 + self.names.index(name)] += float(s)
        c[0] = max(0.0, 1.0 - float(c[1:].sum()))
        return c.expand(n, -1)

    def domain_latents(self, z: torch.Tensor, strengths: dict[str, float]) -> torch.Tensor:
        c = self.class_vector(len(z), strengths)
        if self.kind == "z-concat":
            return self.cmapping(z, c)
        return self.generator.mapping(z) + c[:, 1:] @ self.offsets


class ConditionalTrainer:
    """The training protocol of appendix B with the losses of ``expander.train`` (per step: replay on
    class 0 against the frozen parent, NADA on ``domains_per_step`` classes vs. class 0 of the same z)."""

    def __init__(self, model: ClassConditional, parent_generator: Generator, prompts: dict[str, str], guidance, config: ExpansionConfig):
        self.model, self.prompts, self.guidance, self.config = model, prompts, guidance, config
        self.parent = copy.deepcopy(parent_generator).eval().requires_grad_(False)
        self.params = model.trainable_parameters()
        for p in self.params:
            p.requires_grad_(True)
        self.optimizer = torch.optim.Adam(self.params, lr=config.lr, betas=config.betas)
        self.rng = torch.Generator().manual_seed(config.seed)
        self.step_index = 0

    def _z(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.model.style_dim, generator=self.rng).to(self.model.generator.w_avg.device)

    def step(self) -> dict[str, float]:
        config, model = self.config, self.model
        names = model.names
        if len(names) > config.domains_per_step:
            picks = torch.randperm(len(names), generator=self.rng)[: config.domains_per_step].tolist()
            names = [names[i] for i in sorted(picks)]
        z_base = self._z(config.base_batch_size)
        z_domains = [self._z(config.batch_size) for _ in names]
        batches = [model.domain_latents(z_base, {})]
        batches += [model.domain_latents(z, {name: 1.0}) for z, name in zip(z_domains, names)]
        batches += [model.domain_latents(z, {}) for z in z_domains]  # class-0 references of the same z
        images = model.generator.synthesis(torch.cat(batches)).split([len(b) for b in batches])  # one batched call
        with torch.no_grad():
            parent_images = self.parent.synthesis(self.parent.mapping(z_base))
        l2, perceptual = loss_replay(images[0], parent_images, self.guidance.perceptual)
        losses = {"loss_replay_l2": config.lambda_replay_l2 * l2, "loss_replay_perceptual": config.lambda_replay_perceptual * perceptual}
        nada = images[0].new_zeros(())
        for i, name in enumerate(names):
            domain_images, reference = images[1 + i], images[1 + len(names) + i]
            nada = nada + loss_nada(self.guidance.clip, domain_images, reference, config.source_prompt, self.prompts[name])
        losses["loss_nada"] = config.lambda_nada / max(1, len(names)) * nada
        self.optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        self.optimizer.step()
        self.step_index += 1
        return {k: float(v.detach()) for k, v in losses.items()}

    def run(self, progress: bool = False) -> ClassConditional:
        from tqdm.auto import tqdm

        for _ in tqdm(range(self.config.steps), disable=not progress, desc=self.model.kind):
            self.step()
        for p in self.params:
            p.requires_grad_(False)
        return self.model.eval()


# --------------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------------


def parse(argv: Optional[Sequence[str]] = None):
    parser = common.base_parser(NAME, __doc__)
    parser.add_argument("--names", nargs="+", default=["hat", "beard", "glasses", "pop_art"], help="world attributes, one domain each (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=500, help="training steps of every method (default: %(default)s)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--domains-per-step", type=int, default=4)
    args = parser.parse_args(argv)
    if args.smoke:
        args.names, args.steps = args.names[:2], 2
    args.eval_samples = args.eval_samples or (8 if args.smoke else 256)
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse(argv)
    out = common.setup(args)
    parent = common.load_parent(args)
    guidance = common.nada_guidance(parent)
    meter = common.WorldMeter(args.eval_samples, args.eval_seed)
    specs = common.domain_specs(len(args.names), args.names)
    prompts = {s.name: s.prompt for s in specs}
    config = common.expansion_config(args, args.steps, domains_per_step=args.domains_per_step)

    methods: dict[str, dict] = {}
    for method in args.methods:
        with common.Stopwatch() as clock:
            if method == "ours":
                model = common.fresh_copy(parent)
                domains = common.add_domains(model, specs)
                expand(model, domains, guidance, config, progress=args.progress)
            else:
                model = ClassConditional(parent, [s.name for s in specs], method, seed=args.seed)
                ConditionalTrainer(model, parent.generator, prompts, guidance, config).run(args.progress)
        report = meter.report(model, parent=parent, pairs=None)
        methods[method] = {
            "seconds": clock.seconds, "summary": common.summary_of(report), "domain_success": report["domain_success"],
            "leakage": report["leakage"], "alignment": {d: {k: a[k] for k in ("perceptual", "factors_preserved", "reference_factors_preserved")} for d, a in report["alignment"].items()},
            "composition": {k: {"both": c["both"], "conflicting": c["conflicting"]} for k, c in report["composition"].items()},
        }
        print(f"{method}: {clock.seconds:.1f} s, success {methods[method]['summary']['mean_success']}, leakage {methods[method]['summary']['mean_leakage']}", flush=True)

    results = {
        "benchmark": NAME, "environment": common.environment(args), "domains": {s.name: s.prompt for s in specs},
        "settings": {"steps": args.steps, "domains_per_step": args.domains_per_step, "eval_samples": args.eval_samples, "seed": args.seed, "eval_seed": args.eval_seed},
        "methods": methods,
    }
    common.write_results(out, results)
    plot(methods, out)
    headers = ["method", "train s", "success", "leakage", "base false pos", "perceptual (lower: aligned)", "factors kept", "base FD", "composition"]
    keys = ["mean_success", "mean_leakage", "mean_base_false_positive", "mean_perceptual", "mean_factors_preserved", "base_fid", "mean_composition"]
    table = [[m, r["seconds"]] + [r["summary"][k] for k in keys] for m, r in methods.items()]
    print(f"\n## Subspace expansion vs. class conditioning ({len(specs)} domains, {args.steps} steps, {args.eval_samples} samples)\n")
    print(common.markdown_table(headers, table))
    print(f"\nresults: {out / 'results.json'}")
    return results


def plot(methods: dict[str, dict], out: Path) -> None:
    plt = common.pyplot()
    panels = [("mean_success", "domain success (higher better)"), ("mean_leakage", "leakage (lower better)"),
              ("mean_perceptual", "perceptual base-vs-domain (lower = aligned)"), ("mean_factors_preserved", "source factors kept (higher better)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4))
    names = list(methods)
    for ax, (key, title) in zip(axes, panels):
        ax.bar(names, [methods[m]["summary"][key] or 0.0 for m in names], color=["C0", "C1", "C2"][: len(names)])
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
    common.save_figure(fig, out / "metrics.png")

    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.4), squeeze=False)
    for ax, m in zip(axes[0], names):
        leak = methods[m]["leakage"]
        rows, cols = leak["rows"], leak["columns"]
        matrix = [[leak["matrix"][r][c] or 0.0 for c in cols] for r in rows]
        ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(rows)), rows, fontsize=7)
        ax.set_title(f"{m}: attribute rate (row samples)", fontsize=9)
        for i, row in enumerate(matrix):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w" if v < 0.5 else "k")
    common.save_figure(fig, out / "leakage.png")


if __name__ == "__main__":
    main()
