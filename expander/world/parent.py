"""The world's parent model: the trained world GAN wrapped as an expandable checkpoint (no domains).

It is what ``expander sample`` uses by default and the starting point of every world expansion.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from ..checkpoint import ExpandedGenerator
from ..generators.stylegan2 import Discriminator, Generator, StyleGAN2Config
from ..guidance.perceptual import PerceptualDistance
from ..subspace.dormancy import dormancy_curve, latent_step_size
from ..utils.io import read_json, read_safetensors

WORLD_BASE_MODEL = "expander/world"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
PARENT_DIR = WEIGHTS_DIR / "portraits"
# Repurposed subspaces sit this many typical per-direction standard deviations of w away from the
# base subspace (the role of the paper's alpha = 20 in FFHQ's W, expressed scale-free). A dormant
# direction barely moves the styles, so the synthesis network has to learn to react to it; the
# farther the subspace, the stronger that signal (the paper's Fig. 17 effect). Measured in the
# world (one domain, 4 augmented CLIP views): at 4 stds glasses were not learnt in 150 steps; at
# 12 stds glasses reached 97% but a hat only 23-42% after 300 steps; at 36 stds the hat reached
# 95% after 100 steps and 98% after 150.
ALPHA_IN_STDS = 36.0


def load_gan_export(folder: str | Path) -> tuple[Generator, Discriminator]:
    """Read what :func:`expander.world.gan.export_world_gan` wrote."""
    folder = Path(folder)
    hint = "rebuild it with `expander world build --what gan`"
    try:
        config = StyleGAN2Config.from_dict(read_json(folder / "config.json", what="world GAN config")["generator"])
        G, D = Generator(config), Discriminator(config)
        g_state = read_safetensors(folder / "generator.safetensors", what="world generator")
        latent_avg = g_state.pop("latent_avg")
        if latent_avg.shape != G.style.w_avg.shape:
            raise ValueError(f"latent_avg has shape {tuple(latent_avg.shape)}, expected {tuple(G.style.w_avg.shape)}")
        G.load_state_dict(g_state, strict=True)
        G.style.w_avg.copy_(latent_avg)
        D.load_state_dict(read_safetensors(folder / "discriminator.safetensors", what="world discriminator"), strict=True)
    except KeyError as err:
        raise ValueError(f"the world GAN export in {folder} lacks {err}; {hint}") from None
    except (RuntimeError, TypeError, ValueError) as err:  # RuntimeError: keys or shapes of another architecture
        raise ValueError(f"the world GAN export in {folder} does not match this expander's world GAN ({err}); {hint}") from None
    return G.eval(), D.eval()


def build_world_parent(
    generator: Generator,
    discriminator: Optional[Discriminator],
    out_dir: str | Path = PARENT_DIR,
    perceptual: Optional[PerceptualDistance] = None,
    description: str = "",
    n_samples: int = 16,
) -> ExpandedGenerator:
    """Wrap the world generator, measure its dormancy curve (when a distance is given), save it."""
    model = ExpandedGenerator.from_generator(
        generator,
        discriminator,
        alpha=1.0,  # replaced below once the basis exists
        num_dormant=generator.style_dim // 4,
        base_model=WORLD_BASE_MODEL,
        description=description or "Portraits world parent generator: 64x64 StyleGAN2 trained on source-domain renders only.",
    )
    model.alpha = round(latent_step_size(model.generator, model.basis, step_scale=ALPHA_IN_STDS), 4)
    if perceptual is not None:
        with torch.no_grad():
            model.basis.dormancy = dormancy_curve(model.generator, model.basis, perceptual, n_samples=n_samples)
    model.save_pretrained(out_dir)
    return model


def main() -> None:  # pragma: no cover - `python -m expander.world.parent GAN_EXPORT_DIR [OUT]`
    import sys

    from .models import load_world_perceptual

    G, D = load_gan_export(sys.argv[1])
    out = sys.argv[2] if len(sys.argv) > 2 else PARENT_DIR
    model = build_world_parent(G, D, out, perceptual=load_world_perceptual())
    print(json.dumps({"out": str(out), "alpha": model.alpha}))


if __name__ == "__main__":
    main()
