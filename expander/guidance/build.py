"""Build the frozen guidance models an expansion needs, once, from short names.

World parents default to the world's models (offline); real parents to the Hub models named here.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional, Sequence

from ..checkpoint import ExpandedGenerator
from ..world.clip import WORLD_CLIPS, WORLD_TEMPLATES
from .perceptual import is_world_model, load_perceptual

REAL_CLIP = ("openai/clip-vit-base-patch32", "openai/clip-vit-base-patch16")
# Two world CLIPs trained from different seeds. Measured in the world (recipes/world-nada-10.yaml,
# README "Results"): mean success 62% with the first alone, 75-83% with both (two seeds). The joint
# recipe adds the third, "world-c" (91%); add-domain keeps two: with three, the base subspace drifted
# further over three successive calls (base FD 146 vs 98).
WORLD_CLIP_ENSEMBLE = ("world", "world-b")
REAL_DIFFUSION = "stable-diffusion-v1-5/stable-diffusion-v1-5"
WORLD = "world"


GUIDANCE_KEYS = ("clip", "clip_loss", "clip_views", "clip_max_projection", "perceptual", "diffusion")


def check_guidance_spec(spec: Any) -> dict[str, Any]:
    """``spec`` (a recipe's ``guidance:`` block) if every value has its type and range; a ValueError naming the first that does not.

    Checked as strictly as the training settings: ``clip_views: true`` or ``2.7`` is a mistake, not 1 or 2.
    """
    import math

    from .clip import DIRECTION_LOSSES
    from .perceptual import NAMES

    if not isinstance(spec, dict):
        raise ValueError(f"guidance must be a mapping of {list(GUIDANCE_KEYS)}, got {spec!r}")
    unknown = sorted(set(spec) - set(GUIDANCE_KEYS), key=str)
    if unknown:
        raise ValueError(f"unknown guidance keys {unknown}; allowed: {sorted(GUIDANCE_KEYS)}")
    clip = spec.get("clip")
    if clip is not None and not (isinstance(clip, str) and clip.strip()) and not (isinstance(clip, list) and clip and all(isinstance(c, str) and c.strip() for c in clip)):
        raise ValueError(f"guidance clip must be a CLIP name (world, world-b, world-c, or a transformers id/folder) or a non-empty list of them, got {clip!r}")
    if "clip_loss" in spec and spec["clip_loss"] not in DIRECTION_LOSSES:
        raise ValueError(f"guidance clip_loss must be one of {list(DIRECTION_LOSSES)}, got {spec['clip_loss']!r}")
    views = spec.get("clip_views")
    if views is not None and (isinstance(views, bool) or not isinstance(views, int) or views < 0):
        raise ValueError(f"guidance clip_views must be a whole number >= 0 (augmented views per image; 0 = none), got {views!r}")
    cap = spec.get("clip_max_projection")
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float)) or not math.isfinite(cap) or cap <= 0):
        raise ValueError(f"guidance clip_max_projection must be a number > 0, or null for no cap, got {cap!r}")
    if "perceptual" in spec and spec["perceptual"] not in NAMES:
        raise ValueError(f"guidance perceptual must be one of {list(NAMES)}, got {spec['perceptual']!r}")
    diffusion = spec.get("diffusion")
    if diffusion is not None and not (isinstance(diffusion, str) and diffusion.strip()):
        raise ValueError(f"guidance diffusion must be 'world' or a diffusers Stable Diffusion id/folder, got {diffusion!r}")
    return spec


def build_guidance(model: ExpandedGenerator, methods: Sequence[str], spec: Optional[dict[str, Any]] = None, config=None, device: str = "cpu"):
    """A :class:`expander.train.Guidance` with only what ``methods`` need (``config``: ExpansionConfig)."""
    from ..losses.sds import ScoreDistillation
    from ..train import ExpansionConfig, Guidance

    config = config or ExpansionConfig()

    spec = dict(check_guidance_spec(spec or {}))
    world = is_world_model(model)
    with _naming_the_model(f"perceptual network {spec.get('perceptual', 'auto')!r}", "--perceptual on the command line, guidance.perceptual in a recipe"):
        guidance = Guidance(perceptual=load_perceptual(spec.get("perceptual", "auto"), model))
    if "nada" in methods:
        from .clip import ClipEncoder, ClipGuidance

        clip = spec.get("clip", list(WORLD_CLIP_ENSEMBLE) if world else list(REAL_CLIP))
        names = [clip] if isinstance(clip, str) else list(clip)
        world_names = [name for name in names if name in WORLD_CLIPS]
        if world_names and len(world_names) != len(names):
            raise ValueError(f"CLIP ensemble {names} mixes world CLIPs {world_names} with other models; the world CLIPs know only the world's words, use them alone")
        if world_names:
            missing = [name for name in world_names if not (WORLD_CLIPS[name] / "model.safetensors").exists()]
            if missing:
                raise FileNotFoundError(f"world CLIP weights {missing} are missing under {WORLD_CLIPS[missing[0]].parent}; reinstall expander (they ship with the package)")

            # World CLIPs are small: projection loss and augmented views (measured reasons in ClipGuidance).
            guidance.clip = ClipGuidance(
                [ClipEncoder.from_pretrained(str(WORLD_CLIPS[name]), device) for name in world_names],
                templates=WORLD_TEMPLATES,
                direction_loss=spec.get("clip_loss", "projection"),
                augment_views=spec.get("clip_views", 4),
                max_projection=spec.get("clip_max_projection"),
            )
        else:
            with _naming_the_model(f"CLIP {names}", "--clip on the command line, guidance.clip in a recipe"):
                guidance.clip = ClipGuidance.from_pretrained(
                    names, device=device, direction_loss=spec.get("clip_loss", "cosine"), augment_views=spec.get("clip_views", 0),
                    max_projection=spec.get("clip_max_projection"),
                )
    if "sds" in methods:
        diffusion = spec.get("diffusion", WORLD if world else REAL_DIFFUSION)
        sds = config.sds_config()
        if diffusion == WORLD:
            from ..world.teacher import WorldTeacher

            guidance.teacher = ScoreDistillation(WorldTeacher(), sds)
        else:
            from .diffusion import StableDiffusionGuidance

            with _naming_the_model(f"diffusion model {diffusion!r}", "--diffusion on the command line, guidance.diffusion in a recipe"):
                teacher = StableDiffusionGuidance.from_pretrained(diffusion, device=device)
            guidance.teacher = ScoreDistillation(teacher, sds)
    return guidance


@contextlib.contextmanager
def _naming_the_model(what: str, where: str) -> Iterator[None]:
    """transformers' and diffusers' load errors (no network, a mistyped id, a folder without weights)
    name neither the setting nor the id the user gave: say both."""
    try:
        yield
    except OSError as err:
        raise OSError(f"could not load the {what} ({where}): {err}") from err

