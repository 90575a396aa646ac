"""`expander world build --what ...`: (re)train one of the world's models and install it in the package.

Training state lives under ``runs/`` (resumable); only the final inference files are copied into
``expander/world/weights/``. The shipped weights were produced by exactly these calls.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional


@dataclass(frozen=True)
class WorldClipRecipe:
    """How one shipped world CLIP is trained (``expander.world.clip.ClipTrainingConfig`` settings)."""

    part: str  # `expander world build --what PART`, and its folder under expander/world/weights/
    seed: int
    misplaced_share: float = 0.0  # share of hard negatives (attributes moved off their place)


# The world's CLIPs, by the name a guidance spec uses (`clip:` in a recipe, `--clip`): world-b is the
# first's recipe from another seed; world-c adds hard negatives. Kept here, not in world.clip, so the
# CLI can list the build parts without importing torch.
WORLD_CLIP_RECIPES = {
    "world": WorldClipRecipe("clip", seed=0),
    "world-b": WorldClipRecipe("clip-b", seed=1),
    "world-c": WorldClipRecipe("clip-c", seed=24680, misplaced_share=0.15),
}
CLIP_PARTS = {recipe.part: name for name, recipe in WORLD_CLIP_RECIPES.items()}  # build part -> CLIP name


def build(what: str, steps: Optional[int] = None, runs: Path = Path("runs"), resume: bool = True) -> Path:
    """Train (or resume) one world part and export it over the shipped weights; ``steps`` None = the shipped length."""
    # The export replaces the package's weights: a count that trains nothing must not get that far.
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be a positive whole number of training steps, got {steps!r}; leave it out for the shipped length")
    if what == "parent" and steps is not None:
        raise ValueError("the parent is not trained (it wraps the world GAN: SeFA basis and dormancy curve), so it takes no steps; build the GAN with --steps instead")
    runs = Path(runs)
    if what == "gan":
        from .gan import GanTrainingConfig, train_world_gan

        config = GanTrainingConfig(steps=steps) if steps is not None else GanTrainingConfig()
        return train_world_gan(runs / "world-gan", config, resume=resume)
    if what == "parent":
        from .models import load_world_perceptual
        from .parent import PARENT_DIR, build_world_parent, load_gan_export

        export = runs / "world-gan" / "export"
        if not export.is_dir():
            raise FileNotFoundError(f"no trained world GAN in {export}; run `expander world build --what gan` first")
        G, D = load_gan_export(export)
        build_world_parent(G, D, PARENT_DIR, perceptual=load_world_perceptual())
        return PARENT_DIR
    if what in CLIP_PARTS:
        from .clip import WORLD_CLIPS, ClipTrainingConfig, evaluate_world_clip, export_world_clip, load_world_clip, train_world_clip

        name = CLIP_PARTS[what]
        recipe = WORLD_CLIP_RECIPES[name]
        config = ClipTrainingConfig(steps=ClipTrainingConfig.steps if steps is None else steps, seed=recipe.seed, misplaced_share=recipe.misplaced_share)
        model_dir = train_world_clip(runs / f"world-{what}", resume=resume, config=config)
        model, tokenizer = load_world_clip(model_dir)
        return export_world_clip(model_dir, WORLD_CLIPS[name], metrics={**evaluate_world_clip(model, tokenizer), "training": asdict(config)})
    if what == "classifier":
        from .classifier import train_world_classifier

        return train_world_classifier(runs / "world-classifier", **({"steps": steps} if steps is not None else {}), resume=resume)
    if what == "perceptual":
        from .perceptual import train_world_perceptual

        return train_world_perceptual(runs / "world-perceptual", **({"steps": steps} if steps is not None else {}), resume=resume)
    raise ValueError(f"unknown world part {what!r}")
