"""Throughput: sampling (ours vs. a grouped-convolution StyleGAN2), SeFA + dormancy, training-step breakdown.

* ``sampling``: images/s of our generator and of the grouped-convolution reference (rosinality's
  formulation, ``expander.generators.reference``) on the *same* random weights (speed does not depend
  on training), interleaved in one process so the ratio is meaningful on a noisy shared machine.
  Sizes above 256 px use ``--large-batch`` (a 1024 px batch of 16 takes minutes on a CPU).
* ``sefa_dormancy``: time of the SeFA factorisation and of the dormancy curve (LPIPS-VGG).
* ``training_step``: where one expansion step of the world parent goes (``expander.train.Expander``
  with the world guidance, NADA domains, default ``ExpansionConfig``): the one batched synthesis
  call, the frozen parent's replay synthesis, the replay perceptual distance, the CLIP guidance
  (NADA loss), the rest of the forward pass, the backward pass and the optimizer step. Each part is
  timed by wrapping the callable the trainer uses, so the step itself is the product's code path.

    python benchmarks/throughput.py                       # 64, 256 and 1024 px; world training step
    python benchmarks/throughput.py --sizes 64 256        # skip 1024 px
    python benchmarks/throughput.py --smoke               # seconds; what the test suite runs

Prints a table and the JSON; with ``--out`` also writes ``results.json`` and ``throughput.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import types
from collections import defaultdict
from pathlib import Path
from typing import Callable

import torch

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import expander.train as train_module  # noqa: E402
from expander.checkpoint import ExpandedGenerator  # noqa: E402
from expander.generators.reference import grouped_convolutions  # noqa: E402
from expander.generators.stylegan2 import Generator, StyleGAN2Config  # noqa: E402
from expander.guidance.perceptual import lpips_distance  # noqa: E402
from expander.subspace.dormancy import dormancy_curve  # noqa: E402


def _time(fn, repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def sampling(config: StyleGAN2Config, batch: int, repeats: int) -> dict:
    torch.manual_seed(0)
    G = Generator(config).eval()
    z = torch.randn(batch, config.style_dim)
    ours = _time(lambda: G(z), repeats)
    with grouped_convolutions(G):
        reference = _time(lambda: G(z), repeats)
    return {
        "resolution": config.resolution,
        "params_M": round(sum(p.numel() for p in G.parameters()) / 1e6, 2),
        "batch": batch,
        "ours_images_per_s": round(batch / ours, 2),
        "grouped_reference_images_per_s": round(batch / reference, 2),
        "speedup": round(reference / ours, 2),
    }


@torch.no_grad()
def sefa_and_dormancy(resolution: int, n_samples: int) -> dict:
    """SeFA + dormancy curve for a tiny-width model, LPIPS-VGG distance (random backbone: same cost)."""
    torch.manual_seed(0)
    channels = {2**i: 32 if 2**i <= 32 else 16 for i in range(2, resolution.bit_length())}
    G = Generator(StyleGAN2Config(resolution=resolution, style_dim=128, n_mlp=4, channels=channels)).eval()
    G.style.update_w_avg(1024, torch.Generator().manual_seed(0))
    start = time.perf_counter()
    model = ExpandedGenerator.from_generator(G)
    sefa_s = time.perf_counter() - start
    distance = lpips_distance("vgg", pretrained=False)
    start = time.perf_counter()
    dormancy_curve(model.generator, model.basis, distance, n_samples=n_samples, progress=False)
    curve_s = time.perf_counter() - start
    return {"resolution": resolution, "style_dim": 128, "samples_per_direction": n_samples, "sefa_s": round(sefa_s, 3), "dormancy_curve_s": round(curve_s, 1)}


class _PartTimer:
    """Accumulates wall time per named part of a step; ``wrap`` times any callable under a name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start

        return timed


def training_step(model: ExpandedGenerator, n_domains: int, steps: int, warmup: int = 2) -> dict:
    """Median per-part times of ``steps`` expansion steps (NADA, world guidance) after ``warmup`` steps."""
    from expander.domains import Domain
    from expander.guidance.build import build_guidance
    from expander.train import Expander, ExpansionConfig

    prompts = ["a portrait of a person with glasses", "a portrait of a zombie", "a portrait of a person with a beard", "a portrait of a person wearing a hat"]
    domains = [model.add_domain(Domain(name=f"domain{i}", direction=-1, method="nada", prompt=prompts[i % len(prompts)])) for i in range(n_domains)]
    guidance = build_guidance(model, ["nada"])
    config = ExpansionConfig(steps=warmup + steps, checkpoint_every=10**9)
    trainer = Expander(model, domains, guidance, config)
    timer = _PartTimer()
    # Wrapping what the trainer calls times the product's own step (Expander.step), not a copy of it.
    forward = "forward: the rest (sampling, projection, losses)"
    trainer._losses_and_fakes = timer.wrap(forward, trainer._losses_and_fakes)  # what Expander.step calls: losses() and the fakes
    trainer.synthesis = timer.wrap("synthesis (one batched call)", trainer.synthesis)
    trainer.parent = types.SimpleNamespace(synthesis=timer.wrap("replay: frozen parent synthesis", trainer.parent.synthesis))
    guidance.perceptual = timer.wrap("replay: perceptual distance", guidance.perceptual)
    optimizer = trainer.optimizers["G"]
    optimizer.step = timer.wrap("optimizer step", optimizer.step)
    original_loss_nada = train_module.loss_nada
    train_module.loss_nada = timer.wrap("guidance: CLIP (NADA loss)", original_loss_nada)
    original_directions = train_module.nada_image_directions
    train_module.nada_image_directions = timer.wrap("guidance: CLIP (NADA loss)", original_directions)
    per_step: dict[str, list[float]] = defaultdict(list)
    try:
        for index in range(warmup + steps):
            timer.seconds.clear()
            start = time.perf_counter()
            trainer.step()
            total = time.perf_counter() - start
            if index < warmup:
                continue
            parts = dict(timer.seconds)
            inside_forward = sum(v for k, v in parts.items() if k not in (forward, "optimizer step"))
            parts[forward] -= inside_forward  # the forward pass minus the parts timed inside it
            parts["backward"] = total - parts[forward] - inside_forward - parts["optimizer step"]  # and zero_grad
            for name, seconds in parts.items():
                per_step[name].append(seconds)
    finally:
        train_module.loss_nada = original_loss_nada
        train_module.nada_image_directions = original_directions
    medians = {name: statistics.median(values) for name, values in per_step.items()}
    total = sum(medians.values())
    return {
        "resolution": model.generator.config.resolution,
        "domains": n_domains,
        "domains_per_step": config.domains_per_step,
        "batch_per_domain": config.batch_size,
        "base_batch": config.base_batch_size,
        "steps_timed": steps,
        "step_s": round(total, 4),
        "parts": [{"part": name, "seconds": round(s, 4), "fraction": round(s / total, 3)} for name, s in medians.items()],
    }


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    rows = results["sampling"]
    x = range(len(rows))
    left.bar([i - 0.2 for i in x], [r["ours_images_per_s"] for r in rows], width=0.4, label="ours")
    left.bar([i + 0.2 for i in x], [r["grouped_reference_images_per_s"] for r in rows], width=0.4, label="grouped-conv reference")
    left.set_xticks(list(x), [f"{r['resolution']} px\n(batch {r['batch']})" for r in rows])
    left.set_yscale("log")
    left.set_ylabel("images / s")
    left.set_title("sampling, same random weights")
    left.legend()
    step = results["training_step"]
    parts = step["parts"]
    right.barh([p["part"] for p in parts][::-1], [p["seconds"] for p in parts][::-1])
    right.set_xlabel("seconds (median per step)")
    right.set_title(f"expansion step, {step['resolution']} px world, {step['step_s']:.2f} s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--large-batch", type=int, default=4, help="batch above 256 px (default: %(default)s)")
    parser.add_argument("--model", default=None, help="expanded model of the training-step breakdown (default: the world parent)")
    parser.add_argument("--train-steps", type=int, default=10, help="timed training steps (default: %(default)s)")
    parser.add_argument("--out", default=None, help="folder for results.json and throughput.png")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dormancy-resolution", type=int, default=256)
    parser.add_argument("--dormancy-samples", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for the test suite")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.smoke:
        configs = [StyleGAN2Config(resolution=16, style_dim=32, n_mlp=2, channels={4: 16, 8: 16, 16: 8})]
        args.batch, args.repeats, args.dormancy_resolution, args.dormancy_samples, args.train_steps = 2, 1, 16, 1, 1
    else:
        configs = [StyleGAN2Config(resolution=size) for size in args.sizes]  # rosinality widths, channel_multiplier 2
    results = {"benchmark": "throughput", "threads": torch.get_num_threads()}
    results["sampling"] = [sampling(c, args.batch if c.resolution <= 256 else args.large_batch, args.repeats) for c in configs]
    results["sefa_dormancy"] = sefa_and_dormancy(args.dormancy_resolution, args.dormancy_samples)
    parent = common.load_parent(argparse.Namespace(smoke=args.smoke, seed=0, model=args.model))  # tiny random world model with --smoke
    results["training_step"] = training_step(parent, n_domains=4, steps=args.train_steps)
    print(f"{'res':>5} {'params':>8} {'batch':>5} {'ours img/s':>11} {'grouped img/s':>14} {'speedup':>8}")
    for row in results["sampling"]:
        print(f"{row['resolution']:>5} {row['params_M']:>7}M {row['batch']:>5} {row['ours_images_per_s']:>11} {row['grouped_reference_images_per_s']:>14} {row['speedup']:>7}x")
    d = results["sefa_dormancy"]
    print(f"SeFA ({d['resolution']}px, W={d['style_dim']}): {d['sefa_s']} s; dormancy curve ({d['samples_per_direction']} w x {d['style_dim']} directions, LPIPS-VGG): {d['dormancy_curve_s']} s")
    step = results["training_step"]
    print(f"expansion step ({step['resolution']} px, {step['domains_per_step']} domains x {step['batch_per_domain']} + {step['base_batch']} base latents): {step['step_s']} s")
    for part in step["parts"]:
        print(f"  {part['part']:<50} {part['seconds']:>8.4f} s {100 * part['fraction']:>5.1f}%")
    print(json.dumps(results))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        _plot(results, out / "throughput.png")
    return results


if __name__ == "__main__":
    main()
