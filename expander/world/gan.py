"""Adversarial training of the world's StyleGAN2 on source-domain renders only.

Non-saturating logistic loss, lazy R1 on reals, style mixing, an EMA copy of the generator (the
one that is shipped), and a small L2 penalty on the style-affine weights. Why that penalty: a
real StyleGAN trained for weeks ends up with many *dormant* SeFA directions because the data
needs far fewer than 512 dimensions; our generator trains for about an hour on a CPU, so we nudge
the same low-rank structure into place by decaying style-affine weights the data does not need.

Real images are rendered on the fly from a seeded ``torch.Generator`` whose state is saved with
every checkpoint, so ``resume`` continues exactly where a killed run stopped.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..losses.adversarial import loss_d_logistic, loss_g_nonsaturating, loss_r1
from ..generators.stylegan2 import Discriminator, Generator, StyleGAN2Config
from ..utils.io import WORLD_RESTART_HINT, atomic_path, load_training_state, save_training_state
from . import renderer

logger = logging.getLogger(__name__)


def world_generator_config() -> StyleGAN2Config:
    """Architecture of the portraits world's generator: 64x64, 128-d W, ~0.38M parameters."""
    return StyleGAN2Config(resolution=64, style_dim=128, n_mlp=4, channels={4: 64, 8: 64, 16: 64, 32: 32, 64: 16})


@dataclass
class GanTrainingConfig:
    steps: int = 8000  # generator updates
    batch_size: int = 16
    lr: float = 0.002
    betas: tuple = (0.0, 0.99)
    r1_gamma: float = 0.1  # R1 weight; small because 64x64 images and a small D
    r1_every: int = 16  # lazy regularization interval
    mixing_prob: float = 0.9  # style-mixing probability, as in StyleGAN2
    ema_half_life_images: int = 10_000  # EMA of generator weights, in images seen
    lambda_affine_decay: float = 5e-5  # L2 on style-affine weights (see module docstring)
    seed: int = 0
    checkpoint_every: int = 250  # steps between resumable checkpoints
    generator: dict = field(default_factory=lambda: world_generator_config().to_dict())


def _requires_grad(module: torch.nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


def weight_init_seed(seed: int) -> int:
    """The seed the world GAN's weights are initialised from: a 32-bit mix of ``seed`` (torch seeds from the
    low 32 bits only) that no one picks by hand as a sampling seed, unlike ``seed`` itself."""
    return (seed * 0x9E3779B1 + 0x7F4A7C15) % 2**32


def _mixed_latents(G: Generator, batch: int, mixing_prob: float, rng: torch.Generator) -> torch.Tensor:
    """w+ (B, n_latent, style_dim) with style mixing: two w's switched at a random layer."""
    z = torch.randn(2, batch, G.style_dim, generator=rng)
    w = G.mapping(z.flatten(0, 1)).view(2, batch, G.style_dim)
    w_plus = w[0].unsqueeze(1).repeat(1, G.n_latent, 1)
    if torch.rand((), generator=rng).item() < mixing_prob:
        cut = int(torch.randint(1, G.n_latent, (), generator=rng))
        w_plus[:, cut:] = w[1].unsqueeze(1)
    return w_plus


def _affine_decay(G: Generator) -> torch.Tensor:
    return sum(p.square().sum() for name, p in G.named_parameters() if "modulation.weight" in name)


def train_world_gan(out_dir: str | Path, config: Optional[GanTrainingConfig] = None, resume: bool = True, progress: bool = True) -> Path:
    """Train (or resume) the world GAN; returns the folder of the exported weights.

    ``out_dir/state`` holds the resumable state; ``out_dir/export`` the shipped artefacts
    (``generator.safetensors`` with ``latent_avg``, ``discriminator.safetensors``, ``config.json``).
    """
    config = config or GanTrainingConfig()
    out_dir = Path(out_dir)
    # The weights get a stream of their own. After torch.manual_seed(config.seed) the first mapping
    # layer's weight rows would be exactly the z that random_latents(n, seed=config.seed) draws first;
    # with lr_mlp 0.01 training hardly moves them, and those z then resonate with their own weight row
    # (w norm about 1.7x typical: the shipped world GAN, built that way with seed 0, does so for the
    # first 128 latents of seed 0, the default seed of `sample` and `eval`).
    torch.manual_seed(weight_init_seed(config.seed))
    g_config = StyleGAN2Config.from_dict(config.generator)
    G, D = Generator(g_config), Discriminator(g_config)
    G_ema = copy.deepcopy(G).eval()
    _requires_grad(G_ema, False)
    # Lazy regularization rescales Adam's hyper-parameters (StyleGAN2 appendix B).
    d_ratio = config.r1_every / (config.r1_every + 1)
    opt_g = torch.optim.Adam(G.parameters(), lr=config.lr, betas=config.betas)
    opt_d = torch.optim.Adam(D.parameters(), lr=config.lr * d_ratio, betas=tuple(b**d_ratio for b in config.betas))
    rng = torch.Generator().manual_seed(config.seed)  # latents and mixing
    data_rng = torch.Generator().manual_seed(config.seed + 1)  # renders

    modules = {"G": G, "D": D, "G_ema": G_ema}
    optimizers = {"G": opt_g, "D": opt_d}
    generators = {"latents": rng, "data": data_rng}
    state_dir = out_dir / "state"
    start = 0
    if resume and (state_dir / "state.json").exists():
        start = load_training_state(state_dir, modules, optimizers, generators, config=asdict(config), may_change=("steps", "checkpoint_every"), restart_hint=WORLD_RESTART_HINT)["step"]
        logger.info("resumed world GAN training at step %d", start)

    ema_beta = 0.5 ** (config.batch_size / config.ema_half_life_images)
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, disable=not progress, desc="world GAN")
    t0 = time.time()
    for step in bar:
        real = renderer.sample_portraits(config.batch_size, data_rng, with_captions=False).images

        # Discriminator: logistic loss, plus lazy R1 on reals.
        _requires_grad(G, False)
        _requires_grad(D, True)
        with torch.no_grad():
            fake = G.synthesis(_mixed_latents(G, config.batch_size, config.mixing_prob, rng), noise_mode="random")
        loss_d = loss_d_logistic(D(real), D(fake))
        if step % config.r1_every == 0:
            loss_d = loss_d + config.r1_gamma / 2 * loss_r1(D, real) * config.r1_every
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()

        # Generator: non-saturating loss + style-affine decay.
        _requires_grad(G, True)
        _requires_grad(D, False)
        fake = G.synthesis(_mixed_latents(G, config.batch_size, config.mixing_prob, rng), noise_mode="random")
        loss_g = loss_g_nonsaturating(D(fake))
        loss = loss_g + config.lambda_affine_decay * _affine_decay(G)
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()

        with torch.no_grad():
            for p_ema, p in zip(G_ema.parameters(), G.parameters()):
                p_ema.lerp_(p, 1 - ema_beta)

        bar.set_postfix(loss_d=f"{loss_d.item():.3f}", loss_g=f"{loss_g.item():.3f}")
        done = step + 1
        if done % config.checkpoint_every == 0 or done == config.steps:
            save_training_state(state_dir, modules, optimizers, generators, {"step": done, "config": asdict(config)})
            export_world_gan(out_dir / "export", G_ema, D, config)
            logger.info("step %d: loss_d %.3f loss_g %.3f (%.2f s/step)", done, loss_d.item(), loss_g.item(), (time.time() - t0) / max(done - start, 1))
    return out_dir / "export"


def export_world_gan(folder: Path, G_ema: Generator, D: Discriminator, config: GanTrainingConfig) -> None:
    """Write the shippable parts: EMA generator (+ latent_avg), discriminator and config."""
    G_ema.style.update_w_avg(n_samples=8192, generator=torch.Generator().manual_seed(config.seed))
    g_state = {k: v.contiguous() for k, v in G_ema.state_dict().items()}
    g_state["latent_avg"] = G_ema.w_avg.clone()
    d_state = {k: v.contiguous() for k, v in D.state_dict().items()}
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        save_file(g_state, str(tmp / "generator.safetensors"))
        save_file(d_state, str(tmp / "discriminator.safetensors"))
        (tmp / "config.json").write_text(json.dumps({"generator": G_ema.config.to_dict(), "training": asdict(config)}, indent=2))


def main() -> None:  # pragma: no cover - convenience entry for `python -m expander.world.gan OUT [STEPS]`
    import sys

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(int(os.environ.get("EXPANDER_THREADS", "2")))
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else GanTrainingConfig.steps
    train_world_gan(sys.argv[1], GanTrainingConfig(steps=steps))


if __name__ == "__main__":
    main()
