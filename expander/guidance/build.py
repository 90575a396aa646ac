"""Build the frozen guidance models an expansion needs, once, from short names.

World parents default to the world's models (offline); real parents to the Hub models named here.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

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


def build_guidance(model: ExpandedGenerator, methods: Sequence[str], spec: Optional[dict[str, Any]] = None, config=None, device: str = "cpu"):
    """A :class:`expander.train.Guidance` with only what ``methods`` need (``config``: ExpansionConfig)."""
    from ..losses.sds import ScoreDistillation, SdsConfig
    from ..train import ExpansionConfig, Guidance

    config = config or ExpansionConfig()

    spec = dict(spec or {})
    world = is_world_model(model)
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
                augment_views=int(spec.get("clip_views", 4)),
                max_projection=_optional_float(spec.get("clip_max_projection")),
            )
        else:
            guidance.clip = ClipGuidance.from_pretrained(
                names, device=device, direction_loss=spec.get("clip_loss", "cosine"), augment_views=int(spec.get("clip_views", 0)),
                max_projection=_optional_float(spec.get("clip_max_projection")),
            )
    if "sds" in methods:
        diffusion = spec.get("diffusion", WORLD if world else REAL_DIFFUSION)
        sds = SdsConfig(t_min=config.sds_t_min, t_max=config.sds_t_max, guidance_scale=config.sds_guidance_scale, lambda_directional=config.lambda_sds_directional)
        if diffusion == WORLD:
            from ..world.teacher import WorldTeacher

            guidance.teacher = ScoreDistillation(WorldTeacher(), sds)
        else:
            from .diffusion import StableDiffusionGuidance

            guidance.teacher = ScoreDistillation(StableDiffusionGuidance.from_pretrained(diffusion, device=device), sds)
    return guidance


def _optional_float(value: Any) -> Optional[float]:
    return None if value is None else float(value)
