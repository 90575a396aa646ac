"""Frozen CLIP guidance (transformers ``CLIPModel``): one or an ensemble of models, built once.

The same class serves the world's tiny CLIP and real Hub CLIPs (``openai/clip-vit-base-patch32``
+ ``openai/clip-vit-base-patch16`` for real models). Image preprocessing stays in torch so the
NADA gradient flows back into the generator.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

# Prompt templates averaged for the NADA text direction (StyleGAN-NADA uses ImageNet-style templates).
DEFAULT_TEMPLATES = ("a photo of {}.", "a portrait of {}.", "a picture of {}.", "an image of {}.", "{}.")


def clip_pixel_values(images: torch.Tensor, image_size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """[-1, 1] images (B, 3, H, W) -> CLIP pixel values (B, 3, S, S), differentiable."""
    x = (images + 1) / 2
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bicubic", align_corners=False, antialias=True)
    mean_t = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


def load_clip(name_or_path: str, device: str = "cpu"):
    """(CLIPModel, tokenizer) from a Hub id or folder, frozen and in eval mode."""
    from transformers import AutoTokenizer, CLIPModel

    # float32 whatever the checkpoint was saved in (transformers loads fp16/bf16 files as such): the
    # image path feeds float32 pixels, and the loss needs float32 gradients anyway.
    model = CLIPModel.from_pretrained(name_or_path).to(device=device, dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(name_or_path)


def _as_tensor(output) -> torch.Tensor:
    # transformers 5 may return a model output object instead of a tensor from get_*_features.
    if torch.is_tensor(output):
        return output
    for name in ("text_embeds", "image_embeds", "pooler_output"):
        value = getattr(output, name, None)
        if value is not None:
            return value
    raise TypeError(f"unexpected CLIP output {type(output)}")


def out_of_vocabulary(tokenizer, prompt: str) -> list[str]:
    """Words of ``prompt`` that a word-level tokenizer (the world CLIP's) maps to its unknown token.

    Always [] for subword tokenizers: real CLIP's BPE spells any word from pieces (it stores whole
    words as ``photo</w>``, so a word missing as one vocabulary entry is not unknown).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or type(backend.model).__name__ != "WordLevel":
        return []
    text = backend.normalizer.normalize_str(prompt) if backend.normalizer is not None else prompt
    words = [w for w, _ in backend.pre_tokenizer.pre_tokenize_str(text)]
    return [w for w in words if backend.token_to_id(w) is None]


OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ClipEncoder:
    model: object  # transformers.CLIPModel
    tokenizer: object
    image_mean: Sequence[float] = OPENAI_MEAN
    image_std: Sequence[float] = OPENAI_STD

    @classmethod
    def from_pretrained(cls, name_or_path: str, device: str = "cpu") -> "ClipEncoder":
        """Model + tokenizer + the normalisation of its image processor (OpenAI's if it has none)."""
        from transformers import CLIPImageProcessor

        model, tokenizer = load_clip(name_or_path, device)
        try:
            processor = CLIPImageProcessor.from_pretrained(name_or_path)
            return cls(model, tokenizer, tuple(processor.image_mean), tuple(processor.image_std))
        except (OSError, ValueError):
            return cls(model, tokenizer)

    @property
    def image_size(self) -> int:
        return self.model.config.vision_config.image_size

    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """(N, D) L2-normalised text embeddings; warns about words the tokenizer does not know."""
        unknown = sorted({w for p in prompts for w in out_of_vocabulary(self.tokenizer, p)})
        if unknown:
            warnings.warn(f"CLIP does not know the words {unknown}; they are ignored. Rephrase the prompt with known words.", stacklevel=3)
        # CLIP's position embeddings end at 77 tokens: a longer prompt (with its template) would fail
        # inside the text model, so it is cut there, as CLIP's own tokenizer pipeline does, and said so.
        limit = self.model.config.text_config.max_position_embeddings
        too_long = [p for p, ids in zip(prompts, self.tokenizer(list(prompts))["input_ids"]) if len(ids) > limit]
        if too_long:
            warnings.warn(f"CLIP reads at most {limit} tokens; the end of {too_long[0]!r} is ignored. Shorten the prompt.", stacklevel=3)
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=limit, return_tensors="pt")
        device = next(self.model.parameters()).device
        with torch.no_grad():
            features = _as_tensor(self.model.get_text_features(input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device)))
        return F.normalize(features.float(), dim=-1)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images -> (N, D) L2-normalised embeddings; differentiable w.r.t. images."""
        pixels = clip_pixel_values(images, self.image_size, self.image_mean, self.image_std)
        return F.normalize(_as_tensor(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)


DIRECTION_LOSSES = ("cosine", "projection")


class ClipGuidance:
    """An ensemble of frozen CLIP encoders; NADA averages its loss over them.

    ``direction_loss`` says how the image direction is compared with the text direction:
    ``"cosine"`` is StyleGAN-NADA's ``1 - cos`` (scale-free); ``"projection"`` is ``1 - <image
    direction, unit text direction>`` with the image direction left unnormalised, so the loss keeps
    rewarding a *larger* move towards the text. Why both: the cosine is minimised by an arbitrarily
    small change that happens to point the right way, and a small CLIP (the world's) has such
    directions everywhere; measured in the world, a glasses domain trained 150 steps reached 3%
    success with the cosine and 97% with the projection (see the README's results).
    """

    def __init__(
        self,
        encoders: Sequence[ClipEncoder],
        templates: Sequence[str] = DEFAULT_TEMPLATES,
        direction_loss: str = "cosine",
        augment_views: int = 0,  # paired random views (crop + noise) of domain and base images; 0 = off
        augment_min_scale: float = 0.8,  # smallest crop side, as a fraction of the image
        augment_noise: float = 0.05,  # std of the Gaussian noise added to both images of a pair
        augment_blur: float = 1.0,  # views are downsampled by a random factor in [1, augment_blur] and back (1 = off)
        max_projection: Optional[float] = None,  # projection loss: a sample stops pulling once it projects this far (None = no cap)
    ):
        if not encoders:
            raise ValueError("ClipGuidance needs at least one CLIP model")
        if direction_loss not in DIRECTION_LOSSES:
            raise ValueError(f"unknown CLIP direction loss {direction_loss!r}; choose one of {list(DIRECTION_LOSSES)}")
        self.encoders = list(encoders)
        self.templates = tuple(templates)
        self.direction_loss = direction_loss
        if max_projection is not None and (direction_loss != "projection" or max_projection <= 0):
            raise ValueError(f"max_projection ({max_projection}) needs direction_loss='projection' and a positive value")
        # Why a cap: real attribute changes of world renders project 0.6-0.97 onto their text
        # direction, while the uncapped loss keeps pushing samples to 1.2-1.3, past any real change.
        self.max_projection = max_projection
        self.augment_views, self.augment_min_scale, self.augment_noise, self.augment_blur = augment_views, augment_min_scale, augment_noise, augment_blur
        self._directions: dict[tuple, torch.Tensor] = {}  # text directions, computed once per prompt set

    @classmethod
    def from_pretrained(cls, names: Sequence[str], device: str = "cpu", templates: Sequence[str] = DEFAULT_TEMPLATES, **options) -> "ClipGuidance":
        """``options``: ``direction_loss`` and the ``augment_*`` settings of the constructor."""
        return cls([ClipEncoder.from_pretrained(name, device) for name in names], templates, **options)

    def augment(self, domain_images: torch.Tensor, base_images: torch.Tensor, rng: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``augment_views`` random views of each (domain, base) pair, the *same* view for both: (V*B, 3, H, W) x 2.

        Why: a small CLIP can be satisfied by pixel-level changes that do not draw the attribute; a
        change has to survive crops and noise to move every view. Measured in the world (alpha 12
        stds): a hat domain, 300 steps, 0% success without views, 23% and 42% with 4 (two runs), 61%
        with stronger views (crops down to 0.6, noise 0.1, ``augment_blur`` 2.5; one run). At the
        current alpha (36 stds) the default views already reach 98% in 150 steps.

        Several images may be stacked on channels ((B, 3k, H, W), as ``loss_composed_edits`` does):
        they share the crop, the resolution and the noise, which is drawn for one 3-channel image.
        """
        if self.augment_views <= 0:
            return domain_images, base_images
        batch, views = domain_images.shape[0], self.augment_views
        scale = torch.empty(views * batch).uniform_(self.augment_min_scale, 1.0, generator=rng)  # (V*B,)
        shift = (torch.rand(views * batch, 2, generator=rng) * 2 - 1) * (1 - scale)[:, None]  # keeps the crop inside
        theta = torch.zeros(views * batch, 2, 3)
        theta[:, 0, 0], theta[:, 1, 1], theta[:, :, 2] = scale, scale, shift
        channels, height, width = domain_images.shape[1:]
        if channels % 3:
            raise ValueError(f"augment expects RGB images, or RGB images stacked on channels (3k channels), got {channels} channels")
        noise = (torch.randn((views * batch, 3, height, width), generator=rng) * self.augment_noise).repeat(1, channels // 3, 1, 1)  # one noise per view, every stacked image
        theta, noise = theta.to(domain_images), noise.to(domain_images)
        grid = F.affine_grid(theta, [views * batch, *domain_images.shape[1:]], align_corners=False)
        size = domain_images.shape[-1]
        low = size
        if self.augment_blur > 1:  # one random resolution per call, the same for both images of a pair
            low = max(1, round(size / float(torch.empty(()).uniform_(1.0, self.augment_blur, generator=rng))))

        def view(images: torch.Tensor) -> torch.Tensor:
            views_ = F.grid_sample(images.repeat(views, 1, 1, 1), grid, align_corners=False, padding_mode="border")
            if low < size:
                views_ = F.interpolate(F.interpolate(views_, size=low, mode="bilinear", antialias=True, align_corners=False), size=size, mode="bilinear", align_corners=False)
            return views_ + noise

        return view(domain_images), view(base_images)

    def text_direction(
        self,
        encoder: ClipEncoder,
        source: str,
        target: str,
        contrast: Sequence[str] = (),
        contrast_strength: float = 1.0,
        dual_ridge: Optional[float] = None,
    ) -> torch.Tensor:
        """Mean over templates of (normalised target - normalised source) embeddings: (D,).

        ``contrast``: the prompts of the model's *other* domains. Their directions share components
        with this one (every "a person with X" differs from "a person" in the same way, too), and a
        component they share is a way to be paid for drawing another domain's attribute. Two ways to
        remove it:

        - ``contrast_strength`` in [0, 1] (used when ``dual_ridge`` is None): the directions of all
          the domains are centred, by this fraction of their mean (0 = StyleGAN-NADA's plain
          direction). Returns a unit vector.
        - ``dual_ridge`` > 0: the *dual basis* of the domains' directions. With T the (1 + C, D)
          unit directions of this domain and the others and G = T T^T their Gram matrix, the
          direction is u = [(G + ridge I)^-1 T]_0, scaled so that <u, t_0> = 1. <image direction,
          u> is then this domain's coefficient when the image direction is explained by all the
          domains' directions at once (ridge regression): drawing another domain's attribute
          no longer pays, while moving along this domain's own text direction pays as much as with
          the plain direction. The ridge keeps nearly parallel directions from exploding.
          Measured on true renders with the world CLIPs (``python benchmarks/clip_directions.py``,
          ten domains, ridge 0.1): the mean positive pay for another attribute falls from 0.25 to
          0.065, the worst ratio of another attribute's pay to the own from 1.24 to 0.43.
          Not a unit vector (norm >= 1) with the projection loss; normalised for the cosine.
        """
        # Another domain with this domain's own prompt (the same attribute at another alpha) would
        # cancel the direction (t0 - mean(t0, t0) = 0): contrast with each other prompt once, never the own.
        contrast = _other_prompts(contrast, target)
        key = (id(encoder), source, target, contrast, contrast_strength, dual_ridge)
        if key not in self._directions:
            directions = torch.stack([self._raw_direction(encoder, source, prompt) for prompt in (target, *contrast)])  # (1 + C, D)
            if directions[0].norm() < 0.5:  # unit, or zero where the prompts embed alike: a loss without gradient (or NaN), silently
                raise ValueError(f"the prompt {target!r} and the source prompt {source!r} embed alike in CLIP, so there is no edit to learn: give a prompt that differs from the source (or another source_prompt)")
            if dual_ridge is not None and contrast:
                gram = directions @ directions.T  # (1 + C, 1 + C)
                coefficients = torch.linalg.solve(gram + dual_ridge * torch.eye(len(gram), dtype=gram.dtype, device=gram.device), directions)  # (1 + C, D)
                direction = coefficients[0] / (coefficients[0] @ directions[0])  # <u, t_0> = 1
                if self.direction_loss == "cosine":  # 1 - cos needs a unit text direction
                    direction = F.normalize(direction, dim=-1)
            elif contrast:
                direction = F.normalize(directions[0] - contrast_strength * directions.mean(0), dim=-1)
            else:
                direction = directions[0]
            self._directions[key] = direction
        return self._directions[key]

    def exclusive_directions(self, encoder: ClipEncoder, source: str, target: str, others: Sequence[str]) -> torch.Tensor:
        """What each other domain's direction has that this domain's does not: (C, D), unit rows.

        Each of ``others``' raw directions with its component along this domain's raw direction
        removed. A domain image moving along one of them draws another domain's attribute that the
        target text does not ask for (in the world, clown-nose, eyepatch and sketch domains drew
        glasses: their text directions share a glasses-like component). A prompt whose direction is
        the target's own (the same text in other capitals) leaves only rounding error, which
        normalising would blow up to a random unit row: such rows are zero (nothing to exclude).
        """
        others = _other_prompts(others, target)
        key = ("exclusive", id(encoder), source, target, others)
        if key not in self._directions:
            own = self._raw_direction(encoder, source, target)  # (D,)
            if not others:
                self._directions[key] = own.new_zeros(0, own.shape[-1])  # (0, D): nothing to exclude
                return self._directions[key]
            rows = torch.stack([self._raw_direction(encoder, source, prompt) for prompt in others])  # (C, D), unit rows
            beyond = rows - (rows @ own)[:, None] * own  # (C, D)
            norms = beyond.norm(dim=-1, keepdim=True)  # (C, 1)
            self._directions[key] = torch.where(norms > SAME_DIRECTION_TOLERANCE, beyond / norms.clamp_min(SAME_DIRECTION_TOLERANCE), torch.zeros_like(beyond))
        return self._directions[key]

    def _raw_direction(self, encoder: ClipEncoder, source: str, target: str) -> torch.Tensor:
        target_emb = encoder.encode_text([t.format(target) for t in self.templates]).mean(0)
        source_emb = encoder.encode_text([t.format(source) for t in self.templates]).mean(0)
        return F.normalize(target_emb - source_emb, dim=-1)


# Below this norm, what a unit text direction has beyond the target's is rounding error (the same text
# in other capitals or spacing gives the same tokens, about 1e-7), not a direction to exclude.
SAME_DIRECTION_TOLERANCE = 1e-3


def same_text(a: str, b: str) -> bool:
    """Whether two prompts are one text to a CLIP tokenizer: equal up to capitals and spacing."""
    return " ".join(a.casefold().split()) == " ".join(b.casefold().split())


def _other_prompts(prompts: Sequence[str], own: str) -> tuple[str, ...]:
    """``prompts`` without repeats and without ``own``, in their order."""
    return tuple(prompt for prompt in dict.fromkeys(prompts) if prompt != own)
