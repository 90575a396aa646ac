"""The world's evaluation classifier: which target attributes an image shows, and its source factors.

A small CNN (GroupNorm + SiLU, ~0.4M parameters, 1.6 MB) trained on renders with their true labels:

* an attribute head: 17 independent logits (multi-label, binary cross-entropy), one per
  :data:`expander.world.renderer.ATTRIBUTES`;
* a factor head: every :data:`~expander.world.renderer.SOURCE_FACTORS` entry, decoded back to the
  renderer's encoding. Categorical factors (``hair_colour``, ``hair_style``, ``eye_colour``) are
  classified (cross-entropy); hue factors (``background_hue``, ``shirt_hue``) are circular and
  predicted as (cos, sin) of the angle; the other continuous factors are regressed in [0, 1].

Training images are rendered on the fly (``attribute_prob`` 0.15, so an image carries 0..several
attributes) from a seeded ``torch.Generator`` whose state is saved with each checkpoint, so a killed
run resumes exactly. Light augmentation (pixel noise, slight blur) makes it robust to the small
artefacts of generated images; nothing geometric or colour-changing, since those are factors.

Some factors are too small to read back reliably at 64x64 (the brows move a few pixels by less
than 0.3 of the colour range); ``WorldClassifier.reliable_factors`` (derived on load from the held-
out metrics stored in ``config.json``) lists the ones predicted well on source renders, and the
metrics compare images by those only.

It is an *evaluation* instrument only: nothing in the package trains against it (the training-time
perceptual distance, :mod:`expander.world.perceptual`, is a separate network). Its predictions are
computed under ``torch.no_grad``.

Inputs are (N, 3, H, W) images in [-1, 1]; other sizes are resized to 64x64 first.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..utils.io import WORLD_RESTART_HINT, copy_network_folder, load_network_state, load_training_state, read_json, read_network_config, save_network_folder, save_training_state
from . import renderer
from .renderer import ATTRIBUTES, CATEGORICAL, SOURCE_FACTORS

logger = logging.getLogger(__name__)

__all__ = [
    "CLASSIFIER_DIR", "EVAL_SEED", "RESOLUTION", "CIRCULAR_FACTORS", "CONTINUOUS_FACTORS", "FactorCodec",
    "WorldClassifier", "ClassifierTrainingConfig", "train_world_classifier", "export_world_classifier",
    "load_world_classifier", "evaluate_world_classifier", "prepare_images", "prediction_loss", "augment",
    "reliable_factors", "factor_errors", "circular_distance",
]

CLASSIFIER_DIR = Path(__file__).resolve().parent / "weights" / "classifier"
FORMAT_NAME = "expander.world.classifier"
RESOLUTION = 64
# Held-out evaluation seed: training streams start from the training seed (0 by default), never this.
EVAL_SEED = 424_242
CIRCULAR_FACTORS: tuple[str, ...] = tuple(f for f in SOURCE_FACTORS if f.endswith("_hue"))
CONTINUOUS_FACTORS: tuple[str, ...] = tuple(f for f in SOURCE_FACTORS if f not in CATEGORICAL and f not in CIRCULAR_FACTORS)


def prepare_images(images: torch.Tensor, resolution: int = RESOLUTION) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> float32 (N, 3, R, R), resized (bilinear, antialiased) when needed."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(images.shape)}")
    images = images.float()
    if images.shape[-2:] != (resolution, resolution):
        images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    return images


class FactorCodec:
    """Layout of the factor head's outputs and the conversion between outputs and factor values."""

    def __init__(self) -> None:
        self.continuous = [SOURCE_FACTORS.index(f) for f in CONTINUOUS_FACTORS]
        self.circular = [SOURCE_FACTORS.index(f) for f in CIRCULAR_FACTORS]
        self.categorical = [(SOURCE_FACTORS.index(f), n) for f, n in CATEGORICAL.items()]
        self.size = len(self.continuous) + 2 * len(self.circular) + sum(n for _, n in self.categorical)

    def split(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        a, b = len(self.continuous), 2 * len(self.circular)
        continuous = torch.sigmoid(out[:, :a])
        circular = out[:, a : a + b].view(-1, len(self.circular), 2)
        logits, offset = [], a + b
        for _, n in self.categorical:
            logits.append(out[:, offset : offset + n])
            offset += n
        return continuous, circular, logits

    def decode(self, out: torch.Tensor) -> torch.Tensor:
        """Head outputs (N, size) -> factors (N, F) in the renderer's encoding."""
        continuous, circular, logits = self.split(out)
        factors = out.new_zeros(out.shape[0], len(SOURCE_FACTORS))
        factors[:, self.continuous] = continuous
        angle = torch.atan2(circular[..., 1], circular[..., 0])  # (-pi, pi]
        factors[:, self.circular] = torch.remainder(angle / (2 * math.pi), 1.0)
        for (index, _), logit in zip(self.categorical, logits):
            factors[:, index] = logit.argmax(1).float()
        return factors

    def loss(self, out: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
        continuous, circular, logits = self.split(out)
        loss = 4 * F.smooth_l1_loss(continuous, factors[:, self.continuous], beta=0.1)
        angle = factors[:, self.circular] * 2 * math.pi
        target = torch.stack([torch.cos(angle), torch.sin(angle)], -1)
        loss = loss + 2 * F.smooth_l1_loss(circular, target, beta=0.1)
        for (index, _), logit in zip(self.categorical, logits):
            loss = loss + 0.5 / len(self.categorical) * F.cross_entropy(logit, factors[:, index].long())
        return loss


CODEC = FactorCodec()


def prediction_loss(attribute_logits: torch.Tensor, factor_out: torch.Tensor, labels: torch.Tensor, factors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(attribute BCE, factor loss) of a batch: the training objective of both world networks."""
    return F.binary_cross_entropy_with_logits(attribute_logits, labels.float()), CODEC.loss(factor_out, factors)


def augment(images: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """Pixel noise (half the images, sigma up to 0.05) and a slight blur (a quarter of them)."""
    n = images.shape[0]
    draws = torch.rand(n, 3, generator=rng)
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 16).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    mix = ((draws[:, 0] < 0.25).float() * draws[:, 1]).view(n, 1, 1, 1)
    images = images + mix * (blurred - images)
    sigma = ((draws[:, 2] < 0.5).float() * 0.05 * torch.rand(n, generator=rng)).view(n, 1, 1, 1)
    return (images + sigma * torch.randn(images.shape, generator=rng)).clamp(-1, 1)


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.GroupNorm(8, cout), nn.SiLU())


class WorldClassifier(nn.Module):
    """CNN with an attribute head and a factor head; ``features`` is its 128-d penultimate layer."""

    def __init__(self, widths: tuple[int, ...] = (32, 32, 64, 96, 64), feature_dim: int = 128):
        super().__init__()
        w0, w1, w2, w3, w4 = widths
        self.widths, self.feature_dim = tuple(widths), feature_dim
        # Factors it measures well enough to compare two images by (set from the held-out metrics on load).
        self.reliable_factors: list[str] = list(SOURCE_FACTORS)
        self.body = nn.Sequential(
            # 4x4 stride-2 stem: every input pixel reaches 32 channels at 32x32 (1-px details survive).
            nn.Sequential(nn.Conv2d(3, w0, 4, 2, 1, bias=False), nn.GroupNorm(8, w0), nn.SiLU()),
            _block(w0, w1),  # 32
            _block(w1, w2, 2), _block(w2, w2),  # 16
            _block(w2, w3, 2), _block(w3, w3),  # 8
            _block(w3, w4, 2),  # 4
        )
        # Flattened (not pooled) 4x4 map: head position and tilt are factors, keep where things are.
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(w4 * 16, feature_dim), nn.SiLU())
        self.attributes = nn.Linear(feature_dim, len(ATTRIBUTES))
        self.factors = nn.Linear(feature_dim, CODEC.size)

    def config(self) -> dict[str, Any]:
        return {"widths": list(self.widths), "feature_dim": self.feature_dim}

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw outputs: attribute logits (N, A) and factor-head outputs (N, CODEC.size)."""
        h = self.embed(self.body(prepare_images(images)))
        return self.attributes(h), self.factors(h)

    def _batched(self, fn, images: torch.Tensor, batch_size: int) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([fn(chunk) for chunk in images.split(batch_size)]) if len(images) else fn(images)

    def predict_attributes(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """(N, A) probabilities, columns in ATTRIBUTES order."""
        return self._batched(lambda x: torch.sigmoid(self(x)[0]), images, batch_size)

    def predict_factors(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """(N, F) factors in the renderer's encoding (categorical: argmax as a float index)."""
        return self._batched(lambda x: CODEC.decode(self(x)[1]), images, batch_size)

    def features(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """(N, feature_dim) penultimate activations (for Fréchet distances)."""
        return self._batched(lambda x: self.embed(self.body(prepare_images(x))), images, batch_size)

    def predict(self, images: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Everything in one pass: ``attributes`` (probabilities), ``factors``, ``features``."""
        outs: dict[str, list[torch.Tensor]] = {"attributes": [], "factors": [], "features": []}
        with torch.no_grad():
            for chunk in images.split(batch_size):
                h = self.embed(self.body(prepare_images(chunk)))
                outs["attributes"].append(torch.sigmoid(self.attributes(h)))
                outs["factors"].append(CODEC.decode(self.factors(h)))
                outs["features"].append(h)
        return {k: torch.cat(v) for k, v in outs.items()}


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


@dataclass
class ClassifierTrainingConfig:
    steps: int = 3600  # the shipped weights (a 1600-step run resumed to 3600: more steps kept improving the rare attributes)
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup: int = 100
    attribute_prob: float = 0.15
    factor_weight: float = 1.0
    seed: int = 0
    save_every: int = 200


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 2% of ``base`` at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_world_classifier(
    out_dir: Union[str, Path],
    steps: int = ClassifierTrainingConfig.steps,
    batch_size: int = ClassifierTrainingConfig.batch_size,
    seed: int = 0,
    resume: bool = True,
    progress: bool = True,
    export_to: Optional[Union[str, Path]] = CLASSIFIER_DIR,
    eval_samples: int = 2000,
    save_every: int = ClassifierTrainingConfig.save_every,
) -> Path:
    """Train (or resume) the classifier; returns the exported folder.

    ``out_dir/state`` holds the resumable state (checkpoint every ``save_every`` steps),
    ``out_dir/model`` the inference files after training; these (``config.json`` with the held-out
    metrics, ``model.safetensors``) are then copied to ``export_to`` (the package's weights by
    default; ``None`` keeps them in ``out_dir/model`` only). Resuming with a larger ``steps``
    continues training (the schedule follows the new total).
    """
    from tqdm.auto import tqdm

    config = ClassifierTrainingConfig(steps=steps, batch_size=batch_size, seed=seed, save_every=save_every)
    out_dir = Path(out_dir)
    state_dir, model_dir = out_dir / "state", out_dir / "model"
    torch.manual_seed(config.seed)
    model = WorldClassifier().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    rng = torch.Generator().manual_seed(config.seed)  # renders and augmentation
    start = 0
    if resume and (state_dir / "state.json").exists():
        info = load_training_state(state_dir, {"model": model}, {"adamw": optimizer}, {"data": rng}, config=asdict(config), may_change=("steps", "save_every"), restart_hint=WORLD_RESTART_HINT)
        start = info["step"]
        logger.info("resumed world classifier training at step %d", start)

    bar = tqdm(total=config.steps, initial=start, disable=not progress, desc="world classifier")
    avg: dict[str, float] = {}
    began = time.perf_counter()
    for step in range(start, config.steps):
        batch = renderer.sample_portraits(config.batch_size, rng, attribute_prob=config.attribute_prob, with_captions=False)
        images = augment(batch.images, rng)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config.steps, config.lr, config.warmup)
        attribute_logits, factor_out = model(images)
        loss_attr, loss_factor = prediction_loss(attribute_logits, factor_out, batch.labels, batch.factors)
        loss = loss_attr + config.factor_weight * loss_factor
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        optimizer.step()
        for key, value in (("attr", loss_attr.item()), ("factor", loss_factor.item())):
            avg[key] = value if key not in avg else 0.98 * avg[key] + 0.02 * value
        bar.update(1)
        bar.set_postfix(**{k: f"{v:.4f}" for k, v in avg.items()}, s_per_step=f"{(time.perf_counter() - began) / (step + 1 - start):.2f}")
        done = step + 1
        if done % config.save_every == 0 or done == config.steps:
            save_training_state(state_dir, {"model": model}, {"adamw": optimizer}, {"data": rng}, {"step": done, "loss": avg, "config": asdict(config)})
            logger.info("step %d: %s (%.2f s/step)", done, avg, (time.perf_counter() - began) / (done - start))
    bar.close()

    model.eval().requires_grad_(False)
    metrics = evaluate_world_classifier(model, n=eval_samples)
    training = asdict(config) | {"final_loss": avg}
    save_classifier(model, model_dir, metrics=metrics, training=training)
    if export_to is None:
        return model_dir
    return export_world_classifier(model_dir, export_to)


def save_classifier(model: WorldClassifier, folder: Union[str, Path], metrics: Optional[dict] = None, training: Optional[dict] = None) -> Path:
    """``config.json`` (architecture, factor/attribute names, metrics) + ``model.safetensors``."""
    folder = Path(folder)
    config = {
        "format": FORMAT_NAME,
        "architecture": model.config(),
        "resolution": RESOLUTION,
        "attributes": list(ATTRIBUTES),
        "factors": list(SOURCE_FACTORS),
        "categorical": dict(CATEGORICAL),
        "circular": list(CIRCULAR_FACTORS),
        "metrics": metrics or {},
        "training": training or {},
    }
    return save_network_folder(folder, model, config)


def export_world_classifier(model_dir: Union[str, Path], dest: Union[str, Path] = CLASSIFIER_DIR) -> Path:
    """Copy the inference files (never training state) into ``dest`` atomically."""
    return copy_network_folder(model_dir, dest)


def load_world_classifier(folder: Union[str, Path] = CLASSIFIER_DIR) -> WorldClassifier:
    """The frozen evaluation classifier (eval mode, no gradients), loaded strictly."""
    folder = Path(folder)
    config = read_network_config(folder, FORMAT_NAME, what="world classifier")
    if list(config.get("attributes", [])) != list(ATTRIBUTES) or list(config.get("factors", [])) != list(SOURCE_FACTORS):
        raise ValueError(f"the world classifier in {folder} was trained for other attributes/factors; rebuild it: expander world build --what classifier")
    arch = config["architecture"]
    model = WorldClassifier(widths=tuple(arch["widths"]), feature_dim=int(arch["feature_dim"]))
    load_network_state(model, folder, what="world classifier weights")
    model.reliable_factors = reliable_factors(config.get("metrics") or {})
    return model.eval().requires_grad_(False)


RELIABLE_ACCURACY = 0.9  # categorical factors: held-out accuracy on source renders at least this
RELIABLE_MAE = 0.08  # continuous factors: held-out mean abs error on source renders at most this (chance ~0.25)


def reliable_factors(metrics: dict[str, Any]) -> list[str]:
    """Factors the classifier predicts well on source renders (all of them when no metrics are known)."""
    accuracy, mae = metrics.get("source_factor_accuracy"), metrics.get("source_factor_mae")
    if not accuracy or not mae:
        return list(SOURCE_FACTORS)
    return [f for f in SOURCE_FACTORS if (accuracy.get(f, 0) >= RELIABLE_ACCURACY if f in CATEGORICAL else mae.get(f, 1) <= RELIABLE_MAE)]


# --------------------------------------------------------------------------------------------------
# Held-out evaluation
# --------------------------------------------------------------------------------------------------


def circular_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance between hues in [0, 1] on the circle (at most 0.5)."""
    d = torch.remainder(a - b, 1.0)
    return torch.minimum(d, 1 - d)


def factor_errors(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N, F) per-factor error: 0/1 mismatch for categorical, circular distance for hues, |diff| else."""
    errors = (predicted - target).abs()
    for name in CIRCULAR_FACTORS:
        i = SOURCE_FACTORS.index(name)
        errors[:, i] = circular_distance(predicted[:, i], target[:, i])
    for name in CATEGORICAL:
        i = SOURCE_FACTORS.index(name)
        errors[:, i] = (predicted[:, i].round() != target[:, i].round()).float()
    return errors


def evaluate_world_classifier(model: WorldClassifier, n: int = 2000, seed: int = EVAL_SEED, attribute_prob: float = 0.15, batch_size: int = 250) -> dict[str, Any]:
    """Held-out accuracy on ``n`` fresh renders (a seed no training stream uses).

    Returns ``{"n", "seed", "attribute_prob", "attribute_accuracy": {attr: acc}, "attribute_recall":
    {attr: recall on images that have it}, "attribute_precision", "min_attribute_accuracy",
    "mean_attribute_accuracy", "factor_accuracy": {categorical factor: acc}, "factor_mae":
    {continuous factor: mean abs error (circular for hues)}, "source_factor_accuracy" /
    "source_factor_mae": the same on source-domain renders (no attributes)}``.
    """
    rng = torch.Generator().manual_seed(int(seed))
    probs, preds, labels, factors = [], [], [], []
    for count in [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else []):
        batch = renderer.sample_portraits(count, rng, attribute_prob=attribute_prob, with_captions=False)
        out = model.predict(batch.images)
        probs.append(out["attributes"])
        preds.append(out["factors"])
        labels.append(batch.labels)
        factors.append(batch.factors)
    prob, pred, label, factor = torch.cat(probs), torch.cat(preds), torch.cat(labels), torch.cat(factors)
    predicted = prob > 0.5
    correct = (predicted == label).float().mean(0)
    recall = ((predicted & label).sum(0).float() / label.sum(0).clamp(min=1).float())
    precision = ((predicted & label).sum(0).float() / predicted.sum(0).clamp(min=1).float())
    source = renderer.sample_portraits(min(n, 500), rng, with_captions=False)
    source_errors = factor_errors(model.predict_factors(source.images), source.factors)
    errors = factor_errors(pred, factor)

    def split(err: torch.Tensor) -> tuple[dict, dict]:
        acc = {f: round(1 - err[:, SOURCE_FACTORS.index(f)].mean().item(), 4) for f in CATEGORICAL}
        mae = {f: round(err[:, SOURCE_FACTORS.index(f)].mean().item(), 4) for f in SOURCE_FACTORS if f not in CATEGORICAL}
        return acc, mae

    factor_acc, factor_mae = split(errors)
    source_acc, source_mae = split(source_errors)
    return {
        "n": int(n),
        "seed": int(seed),
        "attribute_prob": attribute_prob,
        "attribute_accuracy": {a: round(correct[i].item(), 4) for i, a in enumerate(ATTRIBUTES)},
        "attribute_recall": {a: round(recall[i].item(), 4) for i, a in enumerate(ATTRIBUTES)},
        "attribute_precision": {a: round(precision[i].item(), 4) for i, a in enumerate(ATTRIBUTES)},
        "min_attribute_accuracy": round(correct.min().item(), 4),
        "mean_attribute_accuracy": round(correct.mean().item(), 4),
        "factor_accuracy": factor_acc,
        "factor_mae": factor_mae,
        "source_factor_accuracy": source_acc,
        "source_factor_mae": source_mae,
    }


def main() -> None:  # pragma: no cover - `python -m expander.world.classifier OUT [STEPS] [EXPORT_DIR|-]`
    import sys

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(int(os.environ.get("EXPANDER_THREADS", "1")))
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else ClassifierTrainingConfig.steps
    export = None if len(sys.argv) > 3 and sys.argv[3] == "-" else (sys.argv[3] if len(sys.argv) > 3 else CLASSIFIER_DIR)
    path = train_world_classifier(sys.argv[1], steps=steps, export_to=export, progress=sys.stderr.isatty())
    print(json.dumps(read_json(Path(path) / "config.json")["metrics"], indent=2))


if __name__ == "__main__":
    main()
