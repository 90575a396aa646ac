"""Sampling throughput of our StyleGAN2 vs. the grouped-convolution reference, and SeFA + dormancy time.

Random weights (speed does not depend on training). Both implementations run on the same weights in
the same process, interleaved, so their ratio is meaningful on a noisy shared machine.

    python benchmarks/throughput.py                       # 64 and 256 px, batch 16
    python benchmarks/throughput.py --sizes 64 256 1024   # add 1024 px (slow on a CPU)
    python benchmarks/throughput.py --smoke               # seconds; what the test suite runs
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from expander.checkpoint import ExpandedGenerator
from expander.generators.reference import grouped_convolutions
from expander.generators.stylegan2 import Generator, StyleGAN2Config
from expander.guidance.perceptual import lpips_distance
from expander.subspace.dormancy import dormancy_curve


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


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dormancy-resolution", type=int, default=256)
    parser.add_argument("--dormancy-samples", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for the test suite")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.smoke:
        configs = [StyleGAN2Config(resolution=16, style_dim=32, n_mlp=2, channels={4: 16, 8: 16, 16: 8})]
        args.batch, args.repeats, args.dormancy_resolution, args.dormancy_samples = 2, 1, 16, 1
    else:
        configs = [StyleGAN2Config(resolution=size) for size in args.sizes]  # rosinality widths, channel_multiplier 2
    results = {"sampling": [sampling(c, args.batch, args.repeats) for c in configs]}
    results["sefa_dormancy"] = sefa_and_dormancy(args.dormancy_resolution, args.dormancy_samples)
    print(f"{'res':>5} {'params':>8} {'batch':>5} {'ours img/s':>11} {'grouped img/s':>14} {'speedup':>8}")
    for row in results["sampling"]:
        print(f"{row['resolution']:>5} {row['params_M']:>7}M {row['batch']:>5} {row['ours_images_per_s']:>11} {row['grouped_reference_images_per_s']:>14} {row['speedup']:>7}x")
    d = results["sefa_dormancy"]
    print(f"SeFA ({d['resolution']}px, W={d['style_dim']}): {d['sefa_s']} s; dormancy curve ({d['samples_per_direction']} w x {d['style_dim']} directions, LPIPS-VGG): {d['dormancy_curve_s']} s")
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
