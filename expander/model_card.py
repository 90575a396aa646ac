"""Model card (README.md) for an expanded generator, with a sample grid when it is cheap to render."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .utils.images import save_grid

if TYPE_CHECKING:
    from .checkpoint import ExpandedGenerator

# Rendering one row per domain is quick up to 256 px on a CPU; above that the card skips the grid.
MAX_GRID_RESOLUTION = 256
GRID_COLUMNS = 6
MAX_GRID_ROWS = 12


def write_model_card(model: "ExpandedGenerator", folder: Path) -> None:
    from .checkpoint import SAMPLES_FILE

    has_grid = model.generator.resolution <= MAX_GRID_RESOLUTION
    if has_grid:
        rows = [model.sample("base", n=GRID_COLUMNS, seed=0)]
        rows += [model.sample(name, n=GRID_COLUMNS, seed=0) for name in model.domain_names[: MAX_GRID_ROWS - 1]]
        save_grid(torch.cat(rows), folder / SAMPLES_FILE, nrow=GRID_COLUMNS)

    config = model.generator.config
    tags = ["domain-expansion", "stylegan2", "gan", "expander"]
    lines = ["---", "library_name: expander", "tags:"] + [f"- {t}" for t in tags]
    if model.base_model and "/" in model.base_model and not model.base_model.startswith(("expander/", "/", ".")):
        lines.append(f"base_model: {model.base_model}")
    lines += ["---", "", f"# Expanded StyleGAN2 ({config.resolution}x{config.resolution}, {len(model.domains)} new domains)", ""]
    if model.description:
        lines += [model.description, ""]
    lines += [
        "One generator, many domains: each domain below lives on its own repurposed *dormant* direction of the",
        "latent space (Nitzan et al., *Domain Expansion of Image Generators*, CVPR 2023); the base subspace keeps",
        "the source domain of the parent generator.",
        "",
        f"- parent generator: `{model.base_model or 'unknown'}`",
        f"- W dimension: {config.style_dim}, dormant directions reserved: {model.num_dormant}, default alpha: {model.alpha:g}",
        "",
    ]
    if has_grid:
        lines += [f"![samples: first row is the source domain, then one row per domain]({SAMPLES_FILE})", ""]
    lines += ["| domain | direction | method | prompt / images | alpha | steps |", "|---|---|---|---|---|---|", "| base | - | (source) | - | - | - |"]
    for d in model.domains:
        source = d.prompt or d.images or ""
        lines.append(f"| {d.name} | {d.direction} | {d.method} | {source} | {model.domain_alpha(d):g} | {d.steps} |")
    lines += _training_section(model.training_log)
    first = model.domain_names[0] if model.domains else "base"
    lines += [
        "",
        "## Use",
        "",
        "```bash",
        "pip install expander",
        f'expander sample --model <this repo id> --domain "{first}" -n 16 --out grid.png',
        "```",
        "",
        "```python",
        "from expander import ExpandedGenerator",
        'model = ExpandedGenerator.from_pretrained("<this repo id>")',
        f'images = model.sample("{first}", n=16, seed=0)  # (16, 3, H, W) in [-1, 1]',
        "```",
        "",
    ]
    (folder / "README.md").write_text("\n".join(lines), encoding="utf-8")  # prompts may be any language, whatever the locale


def _training_section(runs: list[dict[str, Any]]) -> list[str]:
    """Markdown lines telling how each training run was set up (what differs from today's defaults)."""
    if not runs:
        return []
    from .checkpoint import TRAINING_FILE
    from .train import ExpansionConfig

    defaults = json.loads(json.dumps(asdict(ExpansionConfig())))  # as the log stores them (tuples -> lists)
    lines = ["", "## Training", ""]
    for index, run in enumerate(runs, 1):
        settings = dict(run.get("settings") or {})
        domain_weights = settings.pop("domain_weights", None) or {}
        negative_prompts = settings.pop("negative_prompts", None) or {}
        steps, seed = settings.pop("steps", "?"), settings.pop("seed", "?")
        changed = [f"`{k}={_short(v)}`" for k, v in settings.items() if k not in defaults or defaults[k] != v]
        head = f"{(run.get('date') or '?')[:10]}, expander {run.get('expander_version') or '?'}"  # null = not recorded
        text = f"- Run {index} ({head}): trained {', '.join(run['trained'])} for {steps} steps (seed {seed})"
        if run.get("replayed"):
            text += f", replaying {', '.join(run['replayed'])}"
        if run.get("guidance"):
            text += "; guidance " + ", ".join(f"{k}: `{_short(v)}`" for k, v in run["guidance"].items())
        if run.get("real_images"):
            text += f"; GAN loss on the real images in `{Path(run['real_images']).name}`"
        text += "; settings changed from the defaults: " + (", ".join(changed) if changed else "none")
        if domain_weights:
            text += "; per-domain loss weights: " + "; ".join(f"{name} " + ", ".join(f"`{k}={_short(v)}`" for k, v in weights.items()) for name, weights in domain_weights.items())
        if negative_prompts:
            text += "; negative prompts: " + "; ".join(f"{name} " + ", ".join(f'"{p}"' for p in prompts) for name, prompts in negative_prompts.items())
        lines.append(text + ".")
    lines += ["", f"Every setting of every run is in [`{TRAINING_FILE}`]({TRAINING_FILE})."]
    return lines


def _short(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)
