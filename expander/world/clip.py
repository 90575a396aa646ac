"""The world's CLIP: a tiny ``transformers.CLIPModel`` trained contrastively on captioned portraits.

Why a real ``CLIPModel``: the NADA loss, the guidance code and the tests then exercise exactly the
code path a real user takes with ``openai/clip-vit-base-patch32`` (``CLIPModel.from_pretrained`` +
``AutoTokenizer.from_pretrained``), only with a model small enough to train on a CPU in half an hour.

* Tokenizer: a word-level ``tokenizers`` model (lowercase, whitespace/punctuation split) over the
  world vocabulary: every word the renderer's captions and attribute phrases use, plus the generic
  prompt-template words ("a photo of ...", "a portrait of ..."). Any other word maps to ``<unk>``;
  :func:`encode_text` warns about such words instead of silently ignoring them.
* Text pooling: transformers' CLIP text model pools the hidden state at the *first* ``eos_token_id``
  of each sequence (unless ``eos_token_id == 2``, the legacy argmax-of-ids rule), so the special
  tokens are ``<pad>=0, <unk>=1, <bos>=2, <eos>=3`` and the text config carries the same ids.
* Training (:func:`train_world_clip`): symmetric InfoNCE with a learnable temperature, like CLIP,
  on portraits rendered on the fly. Captions are re-phrased at random (renderer captions, prompt
  templates, "a portrait of a person with ...") so that the prompts NADA users write are in
  distribution. Pairs whose images carry the same attribute set count as positives of each other
  (soft targets): a batch has many plain "a portrait of a person" images, and treating their
  captions as negatives of one another would be wrong. Optional hard negatives
  (``misplaced_share``, off for the shipped weights): some images carry an attribute moved off its
  place and their captions do not name it, so the model learns where a crown goes and not only
  that crowns are yellow (``benchmarks/clip_shortcuts.py``).
* Images: :func:`clip_pixel_values` is torch-only and differentiable; the world CLIP uses OpenAI's
  normalisation at 64x64, so the same preprocessing serves both the world model and Hub models.

Train the shipped weights with ``python -m expander.world.clip OUT_DIR STEPS [--export DEST]``.
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

# One implementation of the generic (Hub) path, shared with the guidance code: the world CLIP must
# load and preprocess exactly like openai/clip-vit-base-patch32 does.
from ..guidance.clip import OPENAI_MEAN, OPENAI_STD, clip_pixel_values, load_clip
from ..guidance.clip import out_of_vocabulary as check_vocabulary
from ..utils.io import WORLD_RESTART_HINT, atomic_path, load_training_state, save_training_state, write_json
from . import renderer
from .build import WORLD_CLIP_RECIPES

__all__ = [
    "WORLD_CLIP_DIR", "WORLD_CLIPS", "WORLD_TEMPLATES", "ClipTrainingConfig", "build_world_tokenizer", "world_clip_config",
    "world_vocabulary", "word_vocabulary", "clip_pixel_values", "load_clip", "load_world_clip", "encode_text", "encode_images",
    "check_vocabulary", "compose_captions", "train_world_clip", "evaluate_world_clip", "export_world_clip",
]

logger = logging.getLogger(__name__)

WORLD_CLIP_DIR = Path(__file__).parent / "weights" / "clip"
# Names a guidance spec (`clip:` in a recipe, `--clip` on the CLI) may use for shipped world CLIPs.
# "world-b" is the same architecture trained from another seed: an ensemble of independently trained
# models is harder to satisfy with changes that do not draw the attribute (StyleGAN-NADA ensembles
# ViT-B/32 and ViT-B/16 for the same reason).
# "world-c" is trained with hard negatives (``misplaced_share``: attributes moved off their place, not
# captioned), so it refuses what the first two pay for (a crown painted over the eyes), while they keep
# refusing what it lets through (a clown nose on a cheek); see README "Results".
WORLD_CLIPS = {name: WORLD_CLIP_DIR.parent / recipe.part for name, recipe in WORLD_CLIP_RECIPES.items()}

# Prompt templates for the NADA text direction with the world CLIP (all words are in its vocabulary).
WORLD_TEMPLATES = ("a photo of {}.", "a portrait of {}.", "a picture of {}.", "an image of {}.", "{}.")

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")  # ids 0..3; eos must not be 2 (see module docstring)
PAD_ID, UNK_ID, BOS_ID, EOS_ID = range(4)
MAX_TOKENS = 32  # positions, <bos> and <eos> included

# Ways a caption is wrapped into a prompt (training augmentation; WORLD_TEMPLATES are among them).
_PROMPT_WRAPS = (
    "{}", "a photo of {}", "a picture of {}", "an image of {}", "a portrait of {}", "a cartoon of {}",
    "a cartoon drawing of {}", "a rendering of {}", "a close up photo of {}", "a headshot of {}",
    "the face of {}", "this is {}", "a picture of the face of {}",
)
_SUBJECTS = ("a person", "a face", "a portrait of a person", "someone", "a man", "a woman", "a character", "a cartoon person", "a cartoon portrait")
_STYLE_FORMS = ("a {style} of {text}", "{text} in the style of {style}", "{text} in {style} style")
_KIND_WEARING = {"glasses", "sunglasses", "hat", "crown", "eyepatch"}
_STYLES = {"sketch", "pop_art", "pixel_art"}
_NOUNS = {"zombie"}
# Words users may reasonably put in prompts; they occur in the training captions above.
_GENERIC_WORDS = "a an the of with wearing and in style photo picture image portrait person face cartoon drawing rendering close up headshot this is someone man woman character . ,"

# Held-out evaluation seed: training streams start from ``seed`` (0 by default), never from this.
EVAL_SEED = 987_654


# --------------------------------------------------------------------------------------------------
# Vocabulary, tokenizer, model config
# --------------------------------------------------------------------------------------------------


def _words(text: str) -> list[str]:
    """Split like the tokenizer's pre-tokenizer (``\\w+|[^\\w\\s]+``) after lower-casing."""
    import re

    return re.findall(r"\w+|[^\w\s]+", text.lower())


def word_vocabulary(words: Iterable[str]) -> list[str]:
    """Special tokens (ids 0..3), then the words, sorted: the order :func:`build_world_tokenizer` expects."""
    return list(SPECIAL_TOKENS) + sorted(set(words) - set(SPECIAL_TOKENS))


def world_vocabulary() -> list[str]:
    """Special tokens, then every word of the world's captions, phrases and prompt templates (sorted)."""
    words: set[str] = set(_words(_GENERIC_WORDS))
    for phrases in renderer.ATTRIBUTE_PHRASES.values():
        for phrase in phrases:
            words.update(_words(phrase))
    for template in (*_PROMPT_WRAPS, *_SUBJECTS, *_STYLE_FORMS, *WORLD_TEMPLATES):
        words.update(_words(template.replace("{style}", "").replace("{text}", "").replace("{}", "")))
    # The renderer's own caption wording (source captions, connectives): sample it exhaustively
    # rather than reading its private tables; the seed makes the vocabulary deterministic.
    rng = torch.Generator().manual_seed(0)
    labels = torch.rand(4096, len(renderer.ATTRIBUTES), generator=rng) < 0.15
    for text in renderer.caption(labels, rng):
        words.update(_words(text))
    return word_vocabulary(words)


def build_world_tokenizer(vocabulary: Optional[Sequence[str]] = None, max_length: int = MAX_TOKENS):
    """A ``PreTrainedTokenizerFast`` (word level) that ``AutoTokenizer.from_pretrained`` reloads.

    ``vocabulary`` starts with :data:`SPECIAL_TOKENS` (see :func:`word_vocabulary`; default: the
    world's captions' words);
    ``max_length`` is the text model's number of positions.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocabulary = list(vocabulary or world_vocabulary())
    assert tuple(vocabulary[:4]) == SPECIAL_TOKENS, "special tokens must have ids 0..3"
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocabulary)}, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>", special_tokens=[("<bos>", BOS_ID), ("<eos>", EOS_ID)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>",
        model_max_length=max_length, padding_side="right",
    )


def world_clip_config(vocab_size: int):
    """Tiny CLIP: 3-layer text and 4-layer ViT (8x8 patches of 64x64 images), 128-d everywhere (~0.9M params)."""
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(
            vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=MAX_TOKENS, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID, projection_dim=128,
        ),
        vision_config=dict(image_size=64, patch_size=8, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, projection_dim=128),
        projection_dim=128,
    )


def _save_image_processor(folder: Path, image_size: int) -> None:
    """``preprocessor_config.json`` so Hub-style loaders (``ClipEncoder``) find size and normalisation."""
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_mean=list(OPENAI_MEAN), image_std=list(OPENAI_STD),
    )
    processor.save_pretrained(folder)


# --------------------------------------------------------------------------------------------------
# Loading and encoding (shared by the world model and Hub CLIPs)
# --------------------------------------------------------------------------------------------------


def load_world_clip(folder: Union[str, Path] = WORLD_CLIP_DIR, device: str = "cpu"):
    """(CLIPModel, tokenizer) of the world, frozen, through the generic :func:`load_clip` path."""
    folder = Path(folder)
    if not (folder / "model.safetensors").exists():
        raise FileNotFoundError(f"world CLIP weights not found in {folder}; train them with `python -m expander.world.clip OUT_DIR STEPS --export {folder}`")
    return load_clip(str(folder), device)


def _features(output) -> torch.Tensor:
    """transformers 5 returns a model output from ``get_*_features``; older versions a tensor."""
    return output if torch.is_tensor(output) else output.pooler_output


def encode_text(model, tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """(N, D) L2-normalised text embeddings. Warns, listing them, about out-of-vocabulary words."""
    unknown = sorted({w for p in prompts for w in check_vocabulary(tokenizer, p)})
    if unknown:
        warnings.warn(
            f"the world CLIP does not know the words {unknown}; they are read as <unk>. Rephrase the prompt with words from its "
            "vocabulary (`expander.world.clip.world_vocabulary()`).",
            stacklevel=2,
        )
    device = next(model.parameters()).device
    tokens = tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():  # text embeddings are constants of every loss that uses them
        features = _features(model.get_text_features(input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device)))
    return F.normalize(features.float(), dim=-1)  # (N, D)


def encode_images(model, images: torch.Tensor, mean: Sequence[float] = OPENAI_MEAN, std: Sequence[float] = OPENAI_STD) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1] -> (N, D) L2-normalised embeddings, differentiable w.r.t. ``images``."""
    pixels = clip_pixel_values(images, model.config.vision_config.image_size, mean, std)  # (N, 3, S, S)
    return F.normalize(_features(model.get_image_features(pixel_values=pixels)).float(), dim=-1)


# --------------------------------------------------------------------------------------------------
# Training data: renders + re-phrased captions
# --------------------------------------------------------------------------------------------------


def _pick(options: Sequence[Any], rng: torch.Generator) -> Any:
    return options[int(torch.randint(len(options), (), generator=rng))]


def _chance(p: float, rng: torch.Generator) -> bool:
    return bool(torch.rand((), generator=rng) < p)


def _composed_caption(present: list[str], rng: torch.Generator) -> str:
    """"a portrait of a person with X and Y" phrasing for any attribute set (the form NADA prompts take)."""
    phrases = {a: _pick(renderer.ATTRIBUTE_PHRASES[a], rng) for a in present}
    order = [present[int(i)] for i in torch.randperm(len(present), generator=rng)]
    nouns = [a for a in order if a in _NOUNS and _chance(0.5, rng)]
    styles = [a for a in order if a in _STYLES and _chance(0.7, rng)]  # else named like an accessory
    extras = [a for a in order if a not in nouns and a not in styles]
    text = f"a {phrases[nouns[0]]}" if nouns else _pick(_SUBJECTS, rng)
    if extras:
        verb = "wearing" if all(a in _KIND_WEARING for a in extras) and _chance(0.5, rng) else "with"
        joiner = _pick((" and ", ", ", " and "), rng)
        text += f" {verb} " + joiner.join(phrases[a] for a in extras)
    for style in styles:
        text = _pick(_STYLE_FORMS, rng).format(style=phrases[style], text=text)
    return text


def compose_captions(labels: torch.Tensor, rng: torch.Generator) -> list[str]:
    """One training caption per row of (N, A) bool labels: renderer captions or re-phrased ones, wrapped at random."""
    base = renderer.caption(labels, rng)
    captions = []
    for row, text in zip(labels.tolist(), base):
        present = [a for a, on in zip(renderer.ATTRIBUTES, row) if on]
        u = float(torch.rand((), generator=rng))
        if present and u < 0.05:
            text = " and ".join(_pick(renderer.ATTRIBUTE_PHRASES[a], rng) for a in present)  # bare phrases: NADA's "{}." template
        elif u < 0.5:
            text = _composed_caption(present, rng) if present else _pick(_SUBJECTS, rng)
        if _chance(0.35, rng):
            text = _pick(_PROMPT_WRAPS, rng).format(text)
        if _chance(0.3, rng):
            text += "."
        captions.append(text)
    return captions


def _sample_labels(n: int, rng: torch.Generator, max_attributes: int = 4) -> torch.Tensor:
    """(N, A) bool: 20% source-only, 35% exactly one attribute, 45% each attribute with p=0.2 (at most 4)."""
    A = len(renderer.ATTRIBUTES)
    kind = torch.rand(n, generator=rng)
    labels = torch.rand(n, A, generator=rng) < 0.2
    # Keep at most ``max_attributes`` (random ones) so captions fit in MAX_TOKENS.
    rank = torch.rand(n, A, generator=rng).masked_fill(~labels, 2.0).argsort(1).argsort(1)
    labels &= rank < max_attributes
    single = F.one_hot(torch.randint(A, (n,), generator=rng), A).bool()
    labels = torch.where((kind < 0.55)[:, None], single, labels)
    labels[kind < 0.2] = False
    return labels


def _augment(images: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """Mild blur and noise on (N, 3, H, W), so generated (slightly soft, noisy) images look in-distribution."""
    n = images.shape[0]
    blurred = F.interpolate(F.avg_pool2d(images, 2), scale_factor=2, mode="bilinear", align_corners=False)
    use_blur = (torch.rand(n, 1, 1, 1, generator=rng) < 0.25).float()
    sigma = torch.rand(n, 1, 1, 1, generator=rng) * 0.05
    images = images + use_blur * (blurred - images)
    return (images + sigma * torch.randn(images.shape, generator=rng)).clamp(-1, 1)


def _misplace_some(images: torch.Tensor, factors: torch.Tensor, labels: torch.Tensor, rng: torch.Generator, share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard negatives: in about ``share`` of the images that carry a non-style attribute, one of them is
    moved off its place (renderer.move_attribute) and dropped from the labels, so the caption no longer
    names it. Why: a CLIP trained only on correct renders learns "yellow pixels" for a crown; NADA then
    pays as much for a crown painted over an eye as for one on the head (benchmarks/clip_shortcuts.py).

    images: (N, 3, R, R); factors: (N, F); labels: (N, A) bool. share 0 draws nothing from ``rng``.
    """
    if share <= 0:
        return images, labels
    movable = labels.clone()
    movable[:, [renderer.ATTRIBUTES.index(a) for a in _STYLES]] = False
    chosen = (torch.rand(len(images), generator=rng) < share) & movable.any(1)  # (N,)
    rows = chosen.nonzero().flatten().tolist()
    if not rows:
        return images, labels
    # One moved attribute per chosen image, drawn uniformly among its movable ones.
    moved = torch.multinomial(movable[rows].float(), 1, generator=rng).flatten()  # (K,)
    without = labels[rows].clone()
    without[torch.arange(len(rows)), moved] = False
    size = images.shape[-1]
    sign = torch.where(torch.rand(len(rows), generator=rng) < 0.5, -1, 1)
    shift_rows = sign * torch.randint(size // 8, size // 3 + 1, (len(rows),), generator=rng)  # (K,) a clearly wrong place
    shift_cols = torch.randint(-(size // 8), size // 8 + 1, (len(rows),), generator=rng)  # (K,)
    misplaced, _ = renderer.move_attribute(renderer.render(factors[rows], without, size), images[rows], shift_rows.tolist(), shift_cols.tolist())
    images, labels = images.clone(), labels.clone()
    images[rows], labels[rows] = misplaced, without
    return images, labels


def sample_training_batch(n: int, rng: torch.Generator, misplaced_share: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Fresh renders (N, 3, 64, 64), their labels (N, A) and captions, all from ``rng``; with
    ``misplaced_share`` > 0 some carry an attribute in the wrong place, not named by their caption."""
    batch = renderer.sample_portraits(n, rng, attributes=_sample_labels(n, rng), with_captions=False)
    images, labels = _misplace_some(batch.images, batch.factors, batch.labels, rng, misplaced_share)
    return _augment(images, rng), labels, compose_captions(labels, rng)


def contrastive_loss(logits_per_image: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE on (B, B) logits; pairs with identical attribute sets are all positives."""
    same = (labels[:, None, :] == labels[None, :, :]).all(-1).float()  # (B, B), symmetric, diagonal 1
    targets = same / same.sum(1, keepdim=True)
    return (F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_image.t(), targets)) / 2


# --------------------------------------------------------------------------------------------------
# Training loop
# --------------------------------------------------------------------------------------------------


@dataclass
class ClipTrainingConfig:
    steps: int = 1450  # the shipped run (see weights/clip/metrics.json); ~30 min at 1 thread on a shared CPU
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.05
    seed: int = 0
    save_every: int = 100
    # Share of images with an attribute moved off its place and left out of the caption (hard
    # negatives, see _misplace_some). The shipped CLIPs are trained with 0: with 0.15 they stop
    # paying for misplaced hats, crowns and skin colours (benchmarks/clip_shortcuts.py), but the
    # 10-domain NADA recipe measured worse with them (README "Results": mean success 79.8% vs 84.8%
    # over two seeds, leakage mean 9.9% vs 5.2%).
    misplaced_share: float = 0.0


def _lr_at(step: int, config: ClipTrainingConfig) -> float:
    """Linear warm-up, then cosine decay to 5% of the peak."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _optimizer(model, config: ClipTrainingConfig) -> torch.optim.Optimizer:
    # Decay matrices only; norms, biases and the temperature are left alone (as in CLIP).
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.98), eps=1e-6)


def save_world_clip(model, tokenizer, folder: Union[str, Path]) -> Path:
    """Hub layout: config.json, model.safetensors, tokenizer files, preprocessor_config.json."""
    folder = Path(folder)
    with atomic_path(folder) as tmp:  # a kill mid-save leaves the last complete model, never a truncated one
        model.save_pretrained(tmp)  # safetensors by default
        tokenizer.save_pretrained(tmp)
        _save_image_processor(tmp, model.config.vision_config.image_size)
    return folder


def train_world_clip(
    out_dir: Union[str, Path],
    steps: int = ClipTrainingConfig.steps,
    batch_size: int = ClipTrainingConfig.batch_size,
    seed: int = 0,
    resume: bool = True,
    progress: bool = True,
    config: Optional[ClipTrainingConfig] = None,
) -> Path:
    """Train the world CLIP into ``out_dir/model`` (resumable from ``out_dir/state``); returns the model folder.

    ``config`` (a :class:`ClipTrainingConfig`), when given, replaces ``steps``, ``batch_size`` and ``seed``.
    A run killed at any point resumes from its last checkpoint (every ``save_every`` steps) bit for bit;
    resuming with a larger ``steps`` continues training (the learning-rate schedule follows the new total).
    """
    from tqdm.auto import tqdm
    from transformers import CLIPModel

    config = config or ClipTrainingConfig(steps=steps, batch_size=batch_size, seed=seed)
    out_dir = Path(out_dir)
    state_dir, model_dir = out_dir / "state", out_dir / "model"
    torch.manual_seed(config.seed)
    tokenizer = build_world_tokenizer()
    model = CLIPModel(world_clip_config(len(tokenizer))).train()
    optimizer = _optimizer(model, config)
    rng = torch.Generator().manual_seed(config.seed)  # every rendered image, caption and augmentation
    start = 0
    if resume and (state_dir / "state.json").exists():
        info = load_training_state(state_dir, {"model": model}, {"adamw": optimizer}, {"data": rng}, config=asdict(config), may_change=("steps", "save_every"), restart_hint=WORLD_RESTART_HINT)
        start = info["step"]
        logger.info("resumed world CLIP training at step %d", start)

    def checkpoint(step: int, loss: float) -> None:
        save_training_state(state_dir, {"model": model}, {"adamw": optimizer}, {"data": rng}, {"step": step, "loss": loss, "config": asdict(config)})
        save_world_clip(model, tokenizer, model_dir)

    bar = tqdm(total=config.steps, initial=start, disable=not progress, desc="world clip")
    loss_avg, began = None, time.perf_counter()
    for step in range(start, config.steps):
        images, labels, captions = sample_training_batch(config.batch_size, rng, config.misplaced_share)  # (B, 3, 64, 64), (B, A), B
        tokens = tokenizer(captions, padding=True, truncation=True, return_tensors="pt")
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, config)
        pixels = clip_pixel_values(images, model.config.vision_config.image_size, OPENAI_MEAN, OPENAI_STD)
        out = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels)
        loss = contrastive_loss(out.logits_per_image, labels)  # logits already scaled by exp(logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():  # CLIP caps the temperature at 100 so the logits cannot blow up
            model.logit_scale.clamp_(0, math.log(100))
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{loss_avg:.3f}", scale=f"{model.logit_scale.exp().item():.1f}", s_per_step=f"{(time.perf_counter() - began) / (step + 1 - start):.2f}")
        if (step + 1) % config.save_every == 0 or step + 1 == config.steps:
            checkpoint(step + 1, loss_avg)
    bar.close()
    if not (model_dir / "model.safetensors").exists():  # resumed a finished run: still leave a model behind
        save_world_clip(model, tokenizer, model_dir)
    return model_dir


def export_world_clip(model_dir: Union[str, Path], dest: Union[str, Path] = WORLD_CLIP_DIR, metrics: Optional[dict] = None) -> Path:
    """Copy the inference files only (no training state) into ``dest``, plus the evaluation metrics."""
    model_dir, dest = Path(model_dir), Path(dest)
    names = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json")
    # The folder is assembled beside dest and swapped in whole: a kill part-way never leaves new weights
    # beside an old config or metrics, and a running job that memory-maps the old weights (safetensors
    # does) keeps reading them instead of dying with SIGBUS on a rewritten file. Without new metrics,
    # the old ones no longer describe the weights, so they go too.
    with atomic_path(dest, owned=(*names, "metrics.json")) as tmp:
        tmp.mkdir(parents=True)
        for name in names:
            shutil.copyfile(model_dir / name, tmp / name)  # not copy2: package files get ordinary permissions
        if metrics is not None:
            write_json(tmp / "metrics.json", metrics)
    return dest


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------

SOURCE_PROMPT = "a portrait of a person"


def attribute_prompt(attribute: str, phrase: Optional[str] = None) -> str:
    """The NADA-style prompt of an attribute: "a portrait of a person with {phrase}"."""
    return f"{SOURCE_PROMPT} with {phrase or renderer.ATTRIBUTE_PHRASES[attribute][0]}"


@torch.no_grad()
def evaluate_world_clip(model, tokenizer, per_class: int = 64, seed: int = EVAL_SEED) -> dict[str, Any]:
    """Zero-shot attribute retrieval on held-out renders and paraphrase consistency of the text side.

    Retrieval: images with exactly one attribute (or none, class "source") are assigned the class whose
    prompt is most similar; prompts are :func:`attribute_prompt` (first phrase) and ``SOURCE_PROMPT``.
    ``accuracy_caption`` does the same with renderer-style captions averaged over several draws.
    Paraphrases: mean cosine between the prompts of one attribute's paraphrases (``within``) versus
    to every other attribute's paraphrase prompts (``between``), per attribute.
    """
    classes = ["source", *renderer.ATTRIBUTES]
    rng = torch.Generator().manual_seed(seed)
    accuracy: dict[str, float] = {}
    accuracy_caption: dict[str, float] = {}
    text = encode_text(model, tokenizer, [SOURCE_PROMPT] + [attribute_prompt(a) for a in renderer.ATTRIBUTES])  # (C, D)
    # Caption-form class embeddings: mean of 8 renderer captions per class, re-normalised.
    caption_rng = torch.Generator().manual_seed(seed + 1)
    onehots = torch.cat([torch.zeros(1, len(renderer.ATTRIBUTES), dtype=torch.bool), torch.eye(len(renderer.ATTRIBUTES), dtype=torch.bool)])
    caption_text = torch.stack([F.normalize(encode_text(model, tokenizer, renderer.caption(row.expand(8, -1), caption_rng)).mean(0), dim=0) for row in onehots])
    for index, name in enumerate(classes):
        attributes = [] if name == "source" else [name]
        images = renderer.sample_portraits(per_class, rng, attributes=attributes, with_captions=False).images
        emb = encode_images(model, images)  # (n, D)
        accuracy[name] = (emb @ text.t()).argmax(1).eq(index).float().mean().item()
        accuracy_caption[name] = (emb @ caption_text.t()).argmax(1).eq(index).float().mean().item()

    # Paraphrase consistency on the NADA prompt form.
    prompts, owner = [], []
    for a, phrases in renderer.ATTRIBUTE_PHRASES.items():
        prompts += [attribute_prompt(a, p) for p in phrases]
        owner += [a] * len(phrases)
    emb = encode_text(model, tokenizer, prompts)
    sim = emb @ emb.t()  # (P, P)
    owner_t = torch.tensor([renderer.ATTRIBUTES.index(a) for a in owner])
    same = owner_t[:, None] == owner_t[None, :]
    off_diag = ~torch.eye(len(prompts), dtype=torch.bool)
    within, between = {}, {}
    for i, a in enumerate(renderer.ATTRIBUTES):
        rows = owner_t == i
        within[a] = sim[rows][:, rows][off_diag[rows][:, rows]].mean().item()
        between[a] = sim[rows][:, ~same[rows].any(0)].mean().item()
    holds = [a for a in renderer.ATTRIBUTES if within[a] > between[a]]
    return {
        "retrieval_accuracy": accuracy,
        "retrieval_mean": sum(accuracy.values()) / len(accuracy),
        "retrieval_caption_accuracy": accuracy_caption,
        "retrieval_caption_mean": sum(accuracy_caption.values()) / len(accuracy_caption),
        "paraphrase_within": sum(within.values()) / len(within),
        "paraphrase_between": sum(between.values()) / len(between),
        "paraphrase_within_per_attribute": within,
        "paraphrase_between_per_attribute": between,
        "paraphrase_fraction": len(holds) / len(renderer.ATTRIBUTES),
        "per_class": per_class,
        "seed": seed,
    }


def format_metrics(metrics: dict[str, Any]) -> str:
    lines = [f"{'class':<12} {'with-prompt':>11} {'caption':>8} {'within':>7} {'between':>8}"]
    for name, acc in metrics["retrieval_accuracy"].items():
        w = metrics["paraphrase_within_per_attribute"].get(name)
        b = metrics["paraphrase_between_per_attribute"].get(name)
        extra = f" {w:7.3f} {b:8.3f}" if w is not None else ""
        lines.append(f"{name:<12} {acc:11.3f} {metrics['retrieval_caption_accuracy'][name]:8.3f}{extra}")
    lines.append(f"{'mean':<12} {metrics['retrieval_mean']:11.3f} {metrics['retrieval_caption_mean']:8.3f} {metrics['paraphrase_within']:7.3f} {metrics['paraphrase_between']:8.3f}")
    lines.append(f"paraphrase within > between for {metrics['paraphrase_fraction']:.0%} of attributes")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:  # pragma: no cover - `python -m expander.world.clip OUT STEPS`
    parser = argparse.ArgumentParser(description="Train (resumably) and evaluate the world CLIP.")
    parser.add_argument("out_dir")
    parser.add_argument("steps", type=int, nargs="?", default=ClipTrainingConfig.steps)
    parser.add_argument("--batch-size", type=int, default=ClipTrainingConfig.batch_size)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--misplaced-share", type=float, default=ClipTrainingConfig.misplaced_share, help="share of hard negatives: an attribute moved off its place, not captioned")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--export", default=None, help="copy the trained inference files here (e.g. expander/world/weights/clip)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # save_pretrained's shard bar would interleave with ours in the log
    torch.set_num_threads(args.threads)  # the CPU is shared with other training jobs
    began = time.perf_counter()
    config = ClipTrainingConfig(steps=args.steps, batch_size=args.batch_size, seed=args.seed, misplaced_share=args.misplaced_share)
    model_dir = train_world_clip(args.out_dir, progress=not args.no_progress, config=config)
    print(f"trained in {time.perf_counter() - began:.0f} s (this run) -> {model_dir}", flush=True)
    model, tokenizer = load_world_clip(model_dir)
    metrics = evaluate_world_clip(model, tokenizer)
    metrics["training"] = {**asdict(config), "wall_s_this_run": round(time.perf_counter() - began)}
    print(format_metrics(metrics), flush=True)
    write_json(Path(args.out_dir) / "metrics.json", metrics)
    if args.export:
        print(f"exported to {export_world_clip(model_dir, args.export, metrics)}")


if __name__ == "__main__":  # pragma: no cover
    main()
