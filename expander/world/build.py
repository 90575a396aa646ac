"""`expander world build --what ...`: (re)train one of the world's models and install it in the package.

Training state lives under ``runs/`` (resumable); only the final inference files are copied into
``expander/world/weights/``. The shipped weights were produced by exactly these calls.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Optional

# The world's NADA ensemble: build part -> (name in a guidance spec, seed, share of hard negatives).
# clip-b is the first's recipe from another seed; clip-c adds hard negatives (misplaced attributes).
CLIP_MEMBERS = {"clip": ("world", 0, 0.0), "clip-b": ("world-b", 1, 0.0), "clip-c": ("world-c", 24680, 0.15)}


def build(what: str, steps: Optional[int] = None, runs: Path = Path("runs"), resume: bool = True) -> Path:
    runs = Path(runs)
    if what == "gan":
        from .gan import GanTrainingConfig, train_world_gan

        config = GanTrainingConfig(steps=steps) if steps else GanTrainingConfig()
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
    if what in CLIP_MEMBERS:
        from .clip import WORLD_CLIPS, ClipTrainingConfig, evaluate_world_clip, export_world_clip, load_world_clip, train_world_clip

        name, seed, misplaced_share = CLIP_MEMBERS[what]
        config = ClipTrainingConfig(steps=steps or ClipTrainingConfig.steps, seed=seed, misplaced_share=misplaced_share)
        model_dir = train_world_clip(runs / f"world-{what}", resume=resume, config=config)
        model, tokenizer = load_world_clip(model_dir)
        return export_world_clip(model_dir, WORLD_CLIPS[name], metrics={**evaluate_world_clip(model, tokenizer), "training": asdict(config)})
    if what == "classifier":
        from .classifier import train_world_classifier

        return train_world_classifier(runs / "world-classifier", **({"steps": steps} if steps else {}), resume=resume)
    if what == "perceptual":
        from .perceptual import train_world_perceptual

        return train_world_perceptual(runs / "world-perceptual", **({"steps": steps} if steps else {}), resume=resume)
    raise ValueError(f"unknown world part {what!r}")
