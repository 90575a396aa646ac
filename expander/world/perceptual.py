"""The world's perceptual distance: LPIPS on a feature network trained in the portraits world.

``WorldPerceptual`` is called exactly like ``lpips.LPIPS``: ``distance(in0, in1, normalize=False)``
on (N, 3, H, W) images in [-1, 1] (``normalize=True``: in [0, 1]) returns (N, 1, 1, 1). For each of
five feature layers it unit-normalises the features over channels, takes the squared difference,
weights channels with non-negative 1x1 weights, averages over space, and sums over layers. It is
differentiable with respect to both inputs; the network itself is frozen.

The feature network is a plain VGG-style CNN (BatchNorm + ReLU, max-pooling; taps after each of its
five stages at 64, 32, 16, 8 and 4 pixels), a different architecture and training seed from the
evaluation classifier (:mod:`expander.world.classifier`), so training against this distance never
optimises the instrument used to measure results. It is trained in two phases:

1. the backbone predicts the target attributes and source factors of renders (the same objective as
   the classifier, from another random stream);
2. the per-channel weights (LPIPS's "lin" layers) are fitted with the backbone frozen, on in-world
   two-alternative judgements: a *semantic* change of a render (one attribute added, or one
   clearly visible identity factor changed and re-rendered) must come out farther than a
   *nuisance* change of the same render (a 1-2 pixel translation, pixel noise, slight blur, a small
   brightness change). The weights are a mixture ``(1 - lin_mix) * uniform + lin_mix *
   softmax(logits)`` over all channels of all layers (positive, summing to one, so the fit cannot
   collapse to zero, and every layer keeps at least ``(1 - lin_mix) / 5`` of the weight). They are
   then scaled so that two unrelated source portraits are 0.5 apart on average, LPIPS's usual
   range, so loss weights tuned for LPIPS (e.g. replay's ~10) carry over.

Images of other sizes are resized to 64x64 first.
"""

from __future__ import annotations

import json
import logging
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
from .classifier import CODEC, RESOLUTION, augment, lr_at, prediction_loss, prepare_images
from .renderer import ATTRIBUTES, CATEGORICAL, SOURCE_FACTORS

logger = logging.getLogger(__name__)

__all__ = [
    "PERCEPTUAL_DIR", "WorldPerceptual", "PerceptualTrainingConfig", "train_world_perceptual",
    "load_world_perceptual", "perceptual_sanity", "nuisance", "semantic_change",
]

PERCEPTUAL_DIR = Path(__file__).resolve().parent / "weights" / "perceptual"
FORMAT_NAME = "expander.world.perceptual"
EVAL_SEED = 515_151
TARGET_RANDOM_PAIR_DISTANCE = 0.5  # mean distance of two unrelated source portraits after scaling
# Factors not used as "semantic" changes in the calibration judgements: the pose ones (a small
# change is close to a translation) and the brows, whose change moves a few pixels by under 0.3.
_NOT_SEMANTIC = ("head_x", "head_y", "tilt", "brow_thickness", "brow_angle")


def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=False)]


class PerceptualBackbone(nn.Module):
    """VGG-style feature network with five taps, plus the prediction heads used to train it."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 96, 96), embed_dim: int = 64):
        super().__init__()
        w1, w2, w3, w4, w5 = widths
        self.widths, self.embed_dim = tuple(widths), embed_dim
        self.stages = nn.ModuleList([
            nn.Sequential(*_conv(3, w1), *_conv(w1, w1)),  # 64
            nn.Sequential(nn.MaxPool2d(2), *_conv(w1, w2), *_conv(w2, w2)),  # 32
            nn.Sequential(nn.MaxPool2d(2), *_conv(w2, w3), *_conv(w3, w3)),  # 16
            nn.Sequential(nn.MaxPool2d(2), *_conv(w3, w4)),  # 8
            nn.Sequential(nn.MaxPool2d(2), *_conv(w4, w5)),  # 4
        ])
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(w5 * 16, embed_dim), nn.ReLU())
        self.attributes = nn.Linear(embed_dim, len(ATTRIBUTES))
        self.factors = nn.Linear(embed_dim, CODEC.size)

    def config(self) -> dict[str, Any]:
        return {"widths": list(self.widths), "embed_dim": self.embed_dim}

    def taps(self, images: torch.Tensor) -> list[torch.Tensor]:
        feats, h = [], images
        for stage in self.stages:
            h = stage(h)
            feats.append(h)
        return feats

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.embed(self.taps(images)[-1])
        return self.attributes(h), self.factors(h)


def _unit(features: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """LPIPS's normalize_tensor: divide by the L2 norm over channels."""
    return features / (features.square().sum(dim=1, keepdim=True).sqrt() + eps)


class WorldPerceptual(nn.Module):
    """LPIPS-style distance (``lpips.LPIPS`` signature) on :class:`PerceptualBackbone` features."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 96, 96), embed_dim: int = 64):
        super().__init__()
        self.net = PerceptualBackbone(widths, embed_dim)
        # Non-negative per-channel weights of each layer (LPIPS "lin" layers); uniform to start.
        self.lins = nn.ParameterList([nn.Parameter(torch.full((1, c, 1, 1), 1.0 / (c * len(widths)))) for c in widths])

    def config(self) -> dict[str, Any]:
        return self.net.config()

    def layer_distances(self, in0: torch.Tensor, in1: torch.Tensor, normalize: bool = False) -> list[torch.Tensor]:
        """Per-layer distances, each (N, 1, 1, 1); their sum is :meth:`forward`."""
        if normalize:  # [0, 1] -> [-1, 1], as lpips does
            in0, in1 = 2 * in0 - 1, 2 * in1 - 1
        if in0.shape != in1.shape:
            raise ValueError(f"perceptual distance needs images of one shape, got {tuple(in0.shape)} and {tuple(in1.shape)}")
        n = in0.shape[0]
        feats = self.net.taps(prepare_images(torch.cat([in0, in1])))
        out = []
        for feat, lin in zip(feats, self.lins):
            diff = (_unit(feat[:n]) - _unit(feat[n:])).square()
            out.append((diff * lin.clamp(min=0)).sum(dim=1, keepdim=True).mean(dim=(2, 3), keepdim=True))
        return out

    def forward(self, in0: torch.Tensor, in1: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return sum(self.layer_distances(in0, in1, normalize))


# --------------------------------------------------------------------------------------------------
# Judgements for the channel weights: nuisance vs. semantic changes of one render
# --------------------------------------------------------------------------------------------------


def translate(images: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """Shift images by whole pixels (edge pixels repeated where the image moves away)."""
    pad = max(abs(dx), abs(dy))
    if pad == 0:
        return images.clone()
    h, w = images.shape[-2:]
    padded = F.pad(images, (pad, pad, pad, pad), mode="replicate")
    return padded[..., pad - dy : pad - dy + h, pad - dx : pad - dx + w]


def nuisance(images: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """Each image with one small meaning-preserving change: 1-2 px shift, noise, blur or brightness."""
    n = images.shape[0]
    kind = torch.randint(4, (n,), generator=rng)
    out = images.clone()
    amount = torch.rand(n, generator=rng)
    for i in range(n):
        k = int(kind[i])
        x = images[i : i + 1]
        if k == 0:
            step = 1 + int(amount[i] < 0.3)
            axis = int(torch.randint(2, (), generator=rng))
            sign = 1 if torch.rand((), generator=rng) < 0.5 else -1
            out[i] = translate(x, step * sign * (axis == 0), step * sign * (axis == 1))[0]
        elif k == 1:
            out[i] = (x + (0.01 + 0.04 * amount[i]) * torch.randn(x.shape, generator=rng)).clamp(-1, 1)[0]
        elif k == 2:
            out[i] = augment_blur(x, float(0.3 + 0.7 * amount[i]))[0]
        else:
            out[i] = (x + (amount[i] - 0.5) * 0.08).clamp(-1, 1)[0]
    return out


def augment_blur(images: torch.Tensor, strength: float) -> torch.Tensor:
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 16).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    return images + strength * (blurred - images)


def semantic_change(factors: torch.Tensor, labels: torch.Tensor, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(factors, labels) with one meaningful change each: an attribute added, or one identity factor moved."""
    factors, labels = factors.clone(), labels.clone()
    n = factors.shape[0]
    add_attribute = torch.rand(n, generator=rng) < 0.5
    movable = [i for i, f in enumerate(SOURCE_FACTORS) if f not in _NOT_SEMANTIC]
    for i in range(n):
        if add_attribute[i]:
            absent = (~labels[i]).nonzero().flatten()
            if len(absent):
                labels[i, absent[int(torch.randint(len(absent), (), generator=rng))]] = True
                continue
        j = movable[int(torch.randint(len(movable), (), generator=rng))]
        name = SOURCE_FACTORS[j]
        if name in CATEGORICAL:
            factors[i, j] = float((int(factors[i, j]) + 1 + int(torch.randint(CATEGORICAL[name] - 1, (), generator=rng))) % CATEGORICAL[name])
        else:
            delta = 0.3 + 0.3 * float(torch.rand((), generator=rng))
            value = float(factors[i, j])
            factors[i, j] = value + delta if value + delta <= 1 else value - delta
    return factors, renderer.resolve_conflicts(labels)


def judgement_batch(n: int, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(reference, nuisance change, semantic change) images, each (n, 3, 64, 64)."""
    factors = renderer.sample_factors(n, rng)
    labels = renderer.resolve_conflicts(torch.rand(n, len(ATTRIBUTES), generator=rng) < 0.05)
    reference = renderer.render(factors, labels)
    changed_factors, changed_labels = semantic_change(factors, labels, rng)
    return reference, nuisance(reference, rng), renderer.render(changed_factors, changed_labels)


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


@dataclass
class PerceptualTrainingConfig:
    steps: int = 1200  # backbone steps (phase 1)
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup: int = 100
    attribute_prob: float = 0.15
    lin_steps: int = 300  # channel-weight steps (phase 2)
    lin_batch_size: int = 32
    lin_lr: float = 0.05
    lin_mix: float = 0.8  # share of the fitted part of the channel weights (the rest stays uniform)
    seed: int = 1  # the classifier trains from seed 0: a different stream and initialisation
    save_every: int = 200


def train_world_perceptual(
    out_dir: Union[str, Path],
    steps: int = PerceptualTrainingConfig.steps,
    batch_size: int = PerceptualTrainingConfig.batch_size,
    seed: int = PerceptualTrainingConfig.seed,
    lin_steps: int = PerceptualTrainingConfig.lin_steps,
    resume: bool = True,
    progress: bool = True,
    export_to: Optional[Union[str, Path]] = PERCEPTUAL_DIR,
    save_every: int = PerceptualTrainingConfig.save_every,
    lin_batch_size: int = PerceptualTrainingConfig.lin_batch_size,
    sanity_samples: int = 64,
    scale_samples: int = 256,
) -> Path:
    """Train (or resume) the perceptual network (both phases); returns the exported folder.

    ``out_dir/state`` holds the resumable state, ``out_dir/model`` the inference files, which are
    then copied to ``export_to`` (the package's weights by default; ``None``: leave them in
    ``out_dir/model``).
    """
    from tqdm.auto import tqdm

    config = PerceptualTrainingConfig(steps=steps, batch_size=batch_size, seed=seed, lin_steps=lin_steps, lin_batch_size=lin_batch_size, save_every=save_every)
    out_dir = Path(out_dir)
    state_dir, model_dir = out_dir / "state", out_dir / "model"
    torch.manual_seed(config.seed)
    model = WorldPerceptual()
    net = model.net.train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    logits = ChannelLogits(model.net.widths)
    lin_optimizer = torch.optim.Adam(logits.parameters(), lr=config.lin_lr)
    rng = torch.Generator().manual_seed(config.seed + 1000)
    modules = {"model": model, "lin_logits": logits}
    optimizers, generators = {"backbone": optimizer, "lins": lin_optimizer}, {"data": rng}
    start = 0
    if resume and (state_dir / "state.json").exists():
        start = load_training_state(state_dir, modules, optimizers, generators, config=asdict(config), may_change=("steps", "save_every"), restart_hint=WORLD_RESTART_HINT)["step"]
        logger.info("resumed world perceptual training at step %d", start)
    total = config.steps + config.lin_steps
    bar = tqdm(total=total, initial=start, disable=not progress, desc="world perceptual")
    avg: dict[str, float] = {}
    began = time.perf_counter()

    def track(key: str, value: float) -> None:
        avg[key] = value if key not in avg else 0.98 * avg[key] + 0.02 * value

    for step in range(start, total):
        if step < config.steps:  # phase 1: attribute + factor prediction
            batch = renderer.sample_portraits(config.batch_size, rng, attribute_prob=config.attribute_prob, with_captions=False)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, config.steps, config.lr, config.warmup)
            attribute_logits, factor_out = net(augment(batch.images, rng))
            loss_attr, loss_factor = prediction_loss(attribute_logits, factor_out, batch.labels, batch.factors)
            loss = loss_attr + loss_factor
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 2.0)
            optimizer.step()
            track("attr", loss_attr.item())
            track("factor", loss_factor.item())
        else:  # phase 2: channel weights from nuisance-vs-semantic judgements, backbone frozen
            net.eval().requires_grad_(False)
            reference, nuisance_img, semantic_img = judgement_batch(config.lin_batch_size, rng)
            with torch.no_grad():
                feats = net.taps(torch.cat([reference, nuisance_img, semantic_img]))
            weights = logits.weights(config.lin_mix)
            d_nuisance, d_semantic = _distances_from_taps(weights, feats, config.lin_batch_size)
            # 2AFC log-odds on the log ratio (scale-free; the scale is fixed afterwards).
            loss = F.softplus(-2.0 * (torch.log(d_semantic + 1e-8) - torch.log(d_nuisance + 1e-8))).mean()
            lin_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            lin_optimizer.step()
            track("2afc", loss.item())
            track("agree", (d_semantic > d_nuisance).float().mean().item())
        bar.update(1)
        bar.set_postfix(**{k: f"{v:.4f}" for k, v in avg.items()}, s_per_step=f"{(time.perf_counter() - began) / (step + 1 - start):.2f}")
        done = step + 1
        if done % config.save_every == 0 or done == total or done == config.steps:
            save_training_state(state_dir, modules, optimizers, generators, {"step": done, "loss": avg, "config": asdict(config)})
            logger.info("step %d: %s (%.2f s/step)", done, avg, (time.perf_counter() - began) / (done - start))
    bar.close()

    model.eval().requires_grad_(False)
    with torch.no_grad():
        for lin, weight in zip(model.lins, logits.weights(config.lin_mix)):
            lin.copy_(weight)
        scale = _random_pair_scale(model, n=scale_samples)
        for lin in model.lins:
            lin.mul_(scale)
    sanity = perceptual_sanity(model, n=sanity_samples)
    shares = [round(lin.sum().item() / sum(l.sum().item() for l in model.lins), 4) for lin in model.lins]
    save_perceptual(model, model_dir, metrics=sanity, training=asdict(config) | {"final_loss": avg, "scale": scale, "layer_shares": shares})
    if export_to is None:
        return model_dir
    return export_world_perceptual(model_dir, export_to)


class ChannelLogits(nn.Module):
    """Training-time parameters of the channel weights (phase 2); see the module docstring."""

    def __init__(self, widths: tuple[int, ...]):
        super().__init__()
        self.widths = tuple(widths)
        self.logits = nn.Parameter(torch.zeros(sum(widths)))

    def weights(self, mix: float) -> list[torch.Tensor]:
        """Per-layer (1, C, 1, 1) weights: positive, summing to one over all channels."""
        uniform = torch.cat([torch.full((c,), 1.0 / (c * len(self.widths))) for c in self.widths])
        weights = (1 - mix) * uniform + mix * torch.softmax(self.logits, 0)
        return [w.view(1, -1, 1, 1) for w in weights.split(list(self.widths))]


def _distances_from_taps(weights: list[torch.Tensor], feats: list[torch.Tensor], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    d_nuisance, d_semantic = 0, 0
    for feat, weight in zip(feats, weights):
        unit = _unit(feat)
        ref, nui, sem = unit[:n], unit[n : 2 * n], unit[2 * n :]
        d_nuisance = d_nuisance + ((ref - nui).square() * weight).sum(1).mean(dim=(1, 2))
        d_semantic = d_semantic + ((ref - sem).square() * weight).sum(1).mean(dim=(1, 2))
    return d_nuisance, d_semantic


@torch.no_grad()
def _random_pair_scale(model: WorldPerceptual, n: int = 256, seed: int = EVAL_SEED) -> float:
    a = renderer.sample_portraits(n, seed, with_captions=False).images
    b = renderer.sample_portraits(n, seed + 1, with_captions=False).images
    return TARGET_RANDOM_PAIR_DISTANCE / model(a, b).mean().item()


def save_perceptual(model: WorldPerceptual, folder: Union[str, Path], metrics: Optional[dict] = None, training: Optional[dict] = None) -> Path:
    folder = Path(folder)
    config = {
        "format": FORMAT_NAME,
        "architecture": model.config(),
        "resolution": RESOLUTION,
        "metrics": metrics or {},
        "training": training or {},
    }
    return save_network_folder(folder, model, config)


def export_world_perceptual(model_dir: Union[str, Path], dest: Union[str, Path] = PERCEPTUAL_DIR) -> Path:
    """Copy the inference files (never training state) into ``dest`` atomically."""
    return copy_network_folder(model_dir, dest)


def load_world_perceptual(folder: Union[str, Path] = PERCEPTUAL_DIR) -> WorldPerceptual:
    """The frozen world perceptual distance (eval mode, parameters without gradients), loaded strictly."""
    folder = Path(folder)
    config = read_network_config(folder, FORMAT_NAME, what="world perceptual")
    arch = config["architecture"]
    model = WorldPerceptual(widths=tuple(arch["widths"]), embed_dim=int(arch["embed_dim"]))
    load_network_state(model, folder, what="world perceptual weights")
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------------
# Sanity numbers
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def perceptual_sanity(model: WorldPerceptual, n: int = 64, seed: int = EVAL_SEED) -> dict[str, Any]:
    """Mean distances of a render to: itself, a 1-px shift, noise, another identity, itself + each attribute.

    Also ``attribute_beats_shift``: per attribute, the fraction of images for which adding it moves
    the render farther than a 1-pixel translation does; and ``judgement_agreement`` on held-out
    nuisance-vs-semantic triplets.
    """
    rng = torch.Generator().manual_seed(int(seed))
    batch = renderer.sample_portraits(n, rng, with_captions=False)
    x = batch.images
    other = renderer.sample_portraits(n, rng, with_captions=False).images
    shift = model(x, translate(x, 1, 0)).flatten()
    report: dict[str, Any] = {
        "n": n,
        "seed": int(seed),
        "self": model(x, x).mean().item(),
        "symmetry_max_abs": (model(x, other) - model(other, x)).abs().max().item(),
        "shift_1px": shift.mean().item(),
        "noise_0.02": model(x, (x + 0.02 * torch.randn(x.shape, generator=rng)).clamp(-1, 1)).mean().item(),
        "other_identity": model(x, other).mean().item(),
        "attribute_added": {},
        "attribute_beats_shift": {},
    }
    for attribute in ATTRIBUTES:
        labels = batch.labels.clone()
        labels[:, ATTRIBUTES.index(attribute)] = True
        d = model(x, renderer.render(batch.factors, renderer.resolve_conflicts(labels))).flatten()
        report["attribute_added"][attribute] = round(d.mean().item(), 4)
        report["attribute_beats_shift"][attribute] = round((d > shift).float().mean().item(), 4)
    reference, nuisance_img, semantic_img = judgement_batch(n, rng)
    report["judgement_agreement"] = (model(reference, semantic_img) > model(reference, nuisance_img)).float().mean().item()
    return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in report.items()}


def main() -> None:  # pragma: no cover - `python -m expander.world.perceptual OUT [STEPS] [LIN_STEPS] [EXPORT_DIR|-]`
    import sys

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(int(os.environ.get("EXPANDER_THREADS", "1")))
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else PerceptualTrainingConfig.steps
    lin_steps = int(sys.argv[3]) if len(sys.argv) > 3 else PerceptualTrainingConfig.lin_steps
    export = None if len(sys.argv) > 4 and sys.argv[4] == "-" else (sys.argv[4] if len(sys.argv) > 4 else PERCEPTUAL_DIR)
    path = train_world_perceptual(sys.argv[1], steps=steps, lin_steps=lin_steps, export_to=export, progress=sys.stderr.isatty())
    print(json.dumps(read_json(Path(path) / "config.json")["metrics"], indent=2))


if __name__ == "__main__":
    main()
