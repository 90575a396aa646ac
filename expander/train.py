"""Expansion training: the loop only (losses live in ``expander.losses``, guidance is injected).

Each step (Nitzan et al., Sec. 3):

1. sample z, map to w with the frozen mapping network;
2. project onto the base subspace (every repurposed coordinate pinned to the mean);
3. for the domains of this step, add alpha_k * v_k;
4. ONE batched synthesis call for [base latents, replayed existing-domain latents, new-domain latents];
5. losses: each new domain's adaptation loss on its own samples (grouped by method, so each guidance
   model runs once per step), replay (L2 + perceptual to the frozen parent) on the base and the
   replayed subspaces, and the GAN loss on base fakes when a discriminator and real data exist;
6. weighted sum, one optimizer step on the synthesis network only.

A fixed number of domains is drawn per step, so a step costs the same for 5 or 100 domains.
State is checkpointed every ``checkpoint_every`` steps; ``resume`` continues bit-for-bit on CPU.

With an ``accelerate.Accelerator`` (``accelerate launch``), every process runs this step on its own
latents and DDP averages the synthesis (and discriminator) gradients; see ``expander.distributed``
for how such a run relates to a single-process one.
"""

from __future__ import annotations

import copy
import difflib
import json
import logging
import math
from dataclasses import asdict, dataclass, field, is_dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, Union, get_args, get_origin, get_type_hints

import torch
from tqdm.auto import tqdm

from .checkpoint import ExpandedGenerator
from .distributed import SynthesisNetwork, gather_generators, restore_rank_rng
from .domains import MAX_SEED, Domain
from .guidance.clip import same_text
from .guidance.perceptual import PerceptualDistance
from .losses import loss_composed_edits, loss_d_logistic, loss_edit_detail, loss_g_nonsaturating, loss_lowpass_change, loss_mystyle, loss_nada, loss_nada_consistency, loss_nada_image_exclusive, loss_nada_negative, loss_r1, loss_replay, nada_image_directions, nada_image_features
from .utils.io import load_training_state, read_json, save_training_state, setting_differences

if TYPE_CHECKING:  # pragma: no cover
    from accelerate import Accelerator

    from .losses.sds import SdsConfig

logger = logging.getLogger(__name__)

RealSampler = Callable[[int, torch.Generator], torch.Tensor]  # (n, rng) -> real images (n, 3, R, R)


@dataclass
class ExpansionConfig:
    steps: int = 300
    batch_size: int = 4  # latents per trained domain per step
    base_batch_size: int = 8  # base-subspace latents per step (replay + GAN)
    replay_batch_size: Optional[int] = None  # latents per replayed existing domain per step (None = batch_size)
    domains_per_step: int = 4  # new domains per step: cost does not grow with the number of domains
    replay_domains_per_step: int = 2  # existing domains replayed per step (so add-domain forgets nothing)
    # Composition groups per step (0 = off, the paper's setting): a trained NADA/SDS domain's offset is
    # added on top of another domain's subspace and its loss compares with that domain's image, so the
    # edit also holds when two domains are composed (w + a_i v_i + a_j v_j). SDS groups there ask the
    # teacher for both domains' prompts at once (composed classifier-free guidance).
    compositions_per_step: int = 0
    # Composition groups ask for both edits: the composed image must also show the partner's edit
    # relative to the trained domain's own image (else one domain's edit may erase the other's:
    # the projection loss does not see what the partner's attribute loses).
    composition_both_ways: bool = False
    # Composed edits (0 = off): for composed_pairs_per_step pairs of a trained domain i (its latents
    # of this step) and another domain j, the image of w + a_i v_i + a_j v_j must embed in CLIP where
    # e_i + e_j - e_base does, so composing two domains shows both (see loss_composed_edits).
    lambda_composed_edits: float = 0.0
    composed_pairs_per_step: int = 2
    lr: float = 0.002
    betas: tuple = (0.0, 0.99)
    # Cosine learning-rate decay (lr_decay_steps 0 = a constant lr): from step lr_decay_start, over
    # lr_decay_steps steps, down to lr * lr_final_ratio, then held (the discriminator's lr likewise). In
    # absolute steps, not fractions of `steps`, so a run continued for longer (--resume --steps N) takes
    # the same steps as one started that long. Late NADA steps at a constant lr move the domains (and
    # the base FD) by as much as early ones: a decay lets the end of a run settle.
    lr_decay_start: int = 0
    lr_decay_steps: int = 0
    lr_final_ratio: float = 0.1
    lambda_nada: float = 1.0
    # Hinge on moving towards what only the other NADA domains' prompts ask for (0 = off; see loss_nada).
    # Relative to lambda_nada: it is part of loss_nada, so a domain's lambda_nada scales it too (the
    # recipes' measured weights are in these units), unlike the absolute lambda_nada_image_exclusive.
    lambda_nada_exclusive: float = 0.0
    lambda_nada_image_exclusive: float = 0.0  # hinge on moving towards what the other NADA domains of the step draw (0 = off; see loss_nada_image_exclusive)
    # Targets of that hinge: {domain name: [domain names]} restricts a domain's image hinge to the
    # named domains (when they are trained in the same step) instead of every other NADA domain of the
    # step, so a hinge aimed at one measured leak (blue skin's mask read as freckles) does not also
    # pull the domain away from the directions it shares with the rest. Unlisted domains: all others.
    nada_image_exclusive_of: dict = field(default_factory=dict)
    # Negative prompts of NADA and SDS domains: {domain name: [prompts]}, what the domain must not draw
    # (sunglasses for an eyepatch). NADA: a hinge (lambda_nada_negative) against the direction from the
    # source to each negative beyond the domain's own (see loss_nada_negative); SDS: composable
    # diffusion's negation in the guided noise (see ScoreDistillation.guided_noise). Recipes set it with
    # a domain entry's `negative_prompts:`, add-domain with --negative-prompt.
    negative_prompts: dict = field(default_factory=dict)
    lambda_nada_negative: float = 1.0  # acts only on NADA domains with negative prompts
    nada_contrast: float = 1.0  # how much of the model's NADA domains' mean text direction each domain's direction drops (0 = off; see ClipGuidance.text_direction)
    # Ridge of the dual basis of the model's NADA text directions (None = off; replaces nada_contrast,
    # which must then be 0): each domain is paid only for what the other domains' directions do not
    # explain, so drawing another domain's attribute stops paying (see ClipGuidance.text_direction).
    nada_dual_ridge: Optional[float] = None
    # Cross-domain consistency of NADA domains (0 = off): who resembles whom among a step's latents
    # (a softmax over CLIP similarities at this temperature) stays as in the base subspace, so a
    # domain edits each sample instead of replacing them all with one template (see loss_nada_consistency).
    lambda_nada_consistency: float = 0.0
    nada_consistency_temperature: float = 0.1
    lambda_sds: float = 1.0
    lambda_mystyle: float = 1.0
    mystyle_inversion_steps: int = 200  # optimizer steps that invert each of a MyStyle domain's photos into W, before training
    # Low-pass keep (0 = off; meant per domain, for NADA/SDS domains that add an object): the domain's
    # images, average-pooled to lowpass_size x lowpass_size, stay those its edit starts from at the same
    # latents (the base subspace's; a composition group's partner's), so an object edit does not also
    # regrade the picture (see loss_lowpass_change).
    lambda_lowpass_keep: float = 0.0
    lowpass_size: int = 8
    # Smooth edit (0 = off; meant per domain, for NADA/SDS domains that recolour): the domain's edit of
    # the image it starts from keeps no detail finer than smooth_edit_size x smooth_edit_size cells, so a
    # recolour tints regions instead of painting blotches that read as another domain (see loss_edit_detail).
    lambda_smooth_edit: float = 0.0
    smooth_edit_size: int = 8
    lambda_sds_directional: float = 1.0  # SDS directional regularizer (0 = off)
    sds_t_min: float = 0.02  # SDS timestep range, as fractions of the teacher's steps
    sds_t_max: float = 0.5
    sds_guidance_scale: float = 7.5
    # Elementwise clamp of the SDS gradient in the teacher's latent space (null = off, as in DreamFusion
    # and StyleGAN-Fusion): a guard against the large gradients of high t and guidance scale.
    sds_grad_clip: Optional[float] = 1.0
    lambda_replay_l2: float = 10.0  # paper: ~10
    lambda_replay_perceptual: float = 10.0  # paper: ~10
    lambda_gan: float = 0.1  # used only with a discriminator and real images
    r1_gamma: float = 0.1
    r1_every: int = 16
    source_prompt: str = "a portrait of a person"
    seed: int = 0
    checkpoint_every: int = 50
    # Per-domain loss weights: {domain name: {lambda_name: weight}} overriding the weights above for
    # that domain's own adaptation losses (DOMAIN_LOSS_WEIGHTS), e.g. a recolouring domain that needs
    # a lighter cross-domain consistency than domains that add an object. Recipes set it with a
    # domain entry's `weights:`.
    domain_weights: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Check every value's type and range, so a bad recipe fails before anything is trained or written."""
        for name, kind in get_type_hints(type(self)).items():
            setattr(self, name, _checked_setting(name, getattr(self, name), kind))
        at_least = {"lowpass_size": 1, "smooth_edit_size": 1, "lr_decay_start": 0, "lr_decay_steps": 0, "steps": 1, "batch_size": 1, "base_batch_size": 1, "domains_per_step": 1, "replay_domains_per_step": 0, "compositions_per_step": 0, "composed_pairs_per_step": 1, "r1_every": 1, "checkpoint_every": 1, "mystyle_inversion_steps": 1, "seed": 0}
        for name, low in at_least.items():
            if getattr(self, name) < low:
                raise ValueError(f"training setting {name} must be at least {low}, got {getattr(self, name)}")
        if self.seed > MAX_SEED:  # see MAX_SEED: a larger seed repeats a smaller one's latents
            raise ValueError(f"training setting seed must be at most {MAX_SEED} (torch seeds from 32 bits), got {self.seed}")
        if self.replay_batch_size is not None and self.replay_batch_size < 1:
            raise ValueError(f"training setting replay_batch_size must be at least 1 (or null: the batch_size), got {self.replay_batch_size}")
        for name in [n for n in self.__dataclass_fields__ if n.startswith("lambda_")] + ["r1_gamma", "sds_guidance_scale"]:
            if getattr(self, name) < 0:
                raise ValueError(f"training setting {name} must be >= 0 (0 turns the term off), got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"training setting lr must be > 0, got {self.lr}")
        if not 0 < self.lr_final_ratio <= 1:
            raise ValueError(f"training setting lr_final_ratio must be in (0, 1] (the decayed lr as a share of lr), got {self.lr_final_ratio}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"training setting betas must be two numbers in [0, 1) (Adam's beta1, beta2), got {list(self.betas)}")
        if not 0 <= self.nada_contrast <= 1:
            raise ValueError(f"training setting nada_contrast must be in [0, 1], got {self.nada_contrast}")
        if self.nada_dual_ridge is not None:
            if self.nada_dual_ridge <= 0:
                raise ValueError(f"training setting nada_dual_ridge must be > 0 (or null: off), got {self.nada_dual_ridge}")
            if self.nada_contrast > 0:
                raise ValueError(f"training settings nada_dual_ridge and nada_contrast ({self.nada_contrast}) are two ways to shape the text directions; set nada_contrast: 0 to use the dual basis")
        if self.nada_consistency_temperature <= 0:
            raise ValueError(f"training setting nada_consistency_temperature must be > 0 (a softmax temperature over CLIP cosine similarities, e.g. 0.1), got {self.nada_consistency_temperature}")
        self.domain_weights = _checked_domain_weights(self.domain_weights)
        self.nada_image_exclusive_of = _checked_exclusive_targets(self.nada_image_exclusive_of)
        self.negative_prompts = _checked_negative_prompts(self.negative_prompts)
        if self.batch_size < 3 and any(self.weight("lambda_nada_consistency", name) > 0 for name in [None, *self.domain_weights]):
            raise ValueError(f"training setting lambda_nada_consistency needs batch_size >= 3 (each latent ranks at least two others), got {self.batch_size}")
        if self.sds_grad_clip is not None and self.sds_grad_clip <= 0:
            raise ValueError(f"training setting sds_grad_clip must be > 0 (or null: no clamp), got {self.sds_grad_clip}")
        if not 0 <= self.sds_t_min < self.sds_t_max <= 1:
            raise ValueError(f"training settings sds_t_min < sds_t_max must lie in [0, 1] (fractions of the teacher's steps), got {self.sds_t_min} and {self.sds_t_max}")
        if not self.source_prompt.strip():
            raise ValueError("training setting source_prompt must not be empty (it is what NADA measures edits from, e.g. 'a portrait of a person')")

    def lr_scale(self, step: int) -> float:
        """The share of ``lr`` (and of the discriminator's) used at 0-based ``step``: 1 before the decay."""
        if self.lr_decay_steps == 0 or step < self.lr_decay_start:
            return 1.0
        progress = min(1.0, (step - self.lr_decay_start) / self.lr_decay_steps)
        return self.lr_final_ratio + (1 - self.lr_final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def sds_config(self) -> "SdsConfig":
        """The score-distillation settings of this run, as the teacher's SdsConfig."""
        from .losses.sds import SdsConfig

        return SdsConfig(t_min=self.sds_t_min, t_max=self.sds_t_max, guidance_scale=self.sds_guidance_scale, lambda_directional=self.lambda_sds_directional, grad_clip=self.sds_grad_clip)

    def weight(self, name: str, domain: Optional[str]) -> float:
        """The loss weight ``name`` for ``domain``'s adaptation losses: its override, else the run's."""
        return self.domain_weights.get(domain, {}).get(name, getattr(self, name))

    @classmethod
    def from_dict(cls, data: dict) -> "ExpansionConfig":
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            close = {name: difflib.get_close_matches(name, cls.__dataclass_fields__, n=1) for name in unknown}
            hints = "; ".join(f"{name}: did you mean {match[0]}?" for name, match in close.items() if match)
            raise ValueError(f"unknown training settings {unknown}{' (' + hints + ')' if hints else ''}; allowed: {sorted(set(cls.__dataclass_fields__) - {'domain_weights', 'negative_prompts'})} (a domain's loss weights and negative prompts go in its own entry)")
        return cls(**data)

    def with_settings(self, overrides: dict) -> "ExpansionConfig":
        """A copy with ``overrides`` (e.g. a command line's ``--set``) on top, validated like a recipe's settings."""
        return type(self).from_dict({**asdict(self), **overrides})


# Settings a resumed run may change: they do not alter the steps already taken (a run can be continued
# for more steps, or saved more often), unlike every other setting (Expander.check_resumable).
RESUMABLE_CHANGES = ("steps", "checkpoint_every")


# Loss weights a domain may override (ExpansionConfig.domain_weights): those of its own adaptation
# losses, by the method whose losses read them (another method's weight would do nothing). Replay and
# GAN weights act on the shared base subspace, so they stay per run.
DOMAIN_LOSS_WEIGHTS_BY_METHOD = {
    "nada": ("lambda_nada", "lambda_nada_exclusive", "lambda_nada_image_exclusive", "lambda_nada_negative", "lambda_nada_consistency", "lambda_lowpass_keep", "lambda_smooth_edit"),
    "sds": ("lambda_sds", "lambda_lowpass_keep", "lambda_smooth_edit"),
    "mystyle": ("lambda_mystyle",),
}
DOMAIN_LOSS_WEIGHTS = tuple(dict.fromkeys(name for names in DOMAIN_LOSS_WEIGHTS_BY_METHOD.values() for name in names))


def check_run_domains(config: ExpansionConfig, domains: list[Domain], resolution: int) -> None:
    """Every per-domain setting of ``config`` against the domains a run trains, before any model is
    loaded: weights only for trained domains and only ones their method reads, exclusive-hinge targets
    among them, low-pass keep settings that can act."""
    names = [d.name for d in domains]
    strangers = sorted(set(config.domain_weights) - set(names))
    if strangers:
        raise ValueError(f"training setting domain_weights names {strangers}, which this run does not train; trained here: {names}")
    check_domain_weight_methods(config, domains)
    check_exclusive_targets(config, domains)
    check_negative_prompts(config, domains)
    check_lowpass_keep(config, domains, resolution)


def check_lowpass_keep(config: ExpansionConfig, domains: list[Domain], resolution: int) -> None:
    """Refuse low-pass keep and smooth-edit settings that cannot do what they say, before any model is
    loaded: a MyStyle domain's own weight (it has no base image; a run-wide weight applies to the NADA
    and SDS domains only), or cells finer than the images (pooling would then upsample)."""
    for weight_name, size_name in (("lambda_lowpass_keep", "lowpass_size"), ("lambda_smooth_edit", "smooth_edit_size")):
        mystyle = [d.name for d in domains if d.method == "mystyle" and config.domain_weights.get(d.name, {}).get(weight_name, 0) > 0]
        if mystyle:
            raise ValueError(f"{weight_name} of domains {mystyle}: a MyStyle domain has no base image to compare with (its loss already compares with its subject's images); remove that weight")
        used = any(config.weight(weight_name, d.name) > 0 for d in domains if d.method in ("nada", "sds"))
        if used and getattr(config, size_name) > resolution:
            raise ValueError(f"training setting {size_name} ({getattr(config, size_name)}) must be at most the images' resolution ({resolution}): it is the number of cells per side the images are pooled to")


def check_exclusive_targets(config: "ExpansionConfig", domains: Sequence[Domain]) -> None:
    """Refuse ``nada_image_exclusive_of`` entries that name a domain not trained with NADA in the run,
    or give targets to a domain whose image hinge is off (they would do nothing)."""
    nada_names = [d.name for d in domains if d.method == "nada"]
    for domain, targets in config.nada_image_exclusive_of.items():
        strangers = sorted({domain, *targets} - set(nada_names))
        if strangers:
            raise ValueError(f"training setting nada_image_exclusive_of names {strangers}, which this run does not train with nada (the hinge compares what NADA domains of one step draw); NADA domains trained here: {nada_names}")
        if config.weight("lambda_nada_image_exclusive", domain) <= 0:
            raise ValueError(f"training setting nada_image_exclusive_of gives targets to domain {domain!r}, whose lambda_nada_image_exclusive is 0 (off); give it a weight (its entry's weights: {{lambda_nada_image_exclusive: 0.5}}) or remove the entry")


def check_negative_prompts(config: "ExpansionConfig", domains: Sequence[Domain]) -> None:
    """Refuse ``negative_prompts`` that cannot act: for a domain this run does not train with NADA or
    SDS, for a NADA domain whose hinge weight is 0, or naming the domain's own prompt (up to capitals
    and spacing, which CLIP tokenizers ignore: the hinge would then work against the domain itself);
    and a domain's own ``lambda_nada_negative`` without negative prompts (it would do nothing)."""
    idle = sorted(name for name, weights in config.domain_weights.items() if "lambda_nada_negative" in weights and name not in config.negative_prompts)
    if idle:
        raise ValueError(f"lambda_nada_negative of domains {idle} does nothing: they have no negative prompts; give them negative_prompts or remove the weight")
    steered = {d.name: d for d in domains if d.method in ("nada", "sds")}
    for name, prompts in config.negative_prompts.items():
        if name not in steered:
            methods = {d.name: d.method for d in domains}
            what = f"a {methods[name]} domain" if name in methods else "not trained in this run"
            raise ValueError(f"negative prompts of domain {name!r}: it is {what}; negative prompts steer text domains, nada or sds (trained here: {list(steered)})")
        if steered[name].method == "nada" and config.weight("lambda_nada_negative", name) <= 0:
            raise ValueError(f"domain {name!r} has negative prompts but its lambda_nada_negative is 0 (off); give it a weight or remove the negative prompts")
        own = [p for p in prompts if same_text(p, steered[name].prompt or "")]
        if own:
            raise ValueError(f"domain {name!r} lists its own prompt {steered[name].prompt!r} among its negative prompts (as {own[0]!r}); a negative prompt names what the domain must not draw")


def check_domain_weight_methods(config: "ExpansionConfig", domains: Sequence[Domain]) -> None:
    """Refuse a domain weight its method's losses never read (``lambda_sds`` on a NADA domain)."""
    methods = {d.name: d.method for d in domains}
    for name, weights in config.domain_weights.items():
        allowed = DOMAIN_LOSS_WEIGHTS_BY_METHOD.get(methods.get(name), ())
        # lambda_lowpass_keep / lambda_smooth_edit on a MyStyle domain have their own message (check_lowpass_keep)
        useless = sorted(set(weights) - set(allowed) - {"lambda_lowpass_keep", "lambda_smooth_edit"}) if name in methods else []
        if useless:
            raise ValueError(f"loss weights {useless} of domain {name!r} do nothing for a {methods[name]} domain; its weights are {list(allowed)}")


def _checked_domain_weights(value: object) -> dict[str, dict[str, float]]:
    """``domain_weights`` as {domain name: {lambda name: float >= 0}}, or a ValueError saying what is wrong."""
    if not isinstance(value, dict):
        raise ValueError(f"training setting domain_weights must map domain names to {{loss weight: number}}, got {value!r}")
    checked = {}
    for domain, weights in value.items():
        if not isinstance(domain, str) or not isinstance(weights, dict):
            raise ValueError(f"training setting domain_weights: entry {domain!r} must map a domain name to {{loss weight: number}}, got {weights!r}")
        unknown = sorted(set(weights) - set(DOMAIN_LOSS_WEIGHTS))
        if unknown:
            raise ValueError(f"loss weights {unknown} of domain {domain!r} cannot be set per domain; allowed: {list(DOMAIN_LOSS_WEIGHTS)} (the others act on the base subspace: set them in `training`)")
        checked[domain] = {}
        for name, weight in weights.items():
            weight = _checked_setting(f"{name} of domain {domain!r}", weight, float)
            if weight < 0:
                raise ValueError(f"training setting {name} of domain {domain!r} must be >= 0 (0 turns the term off for that domain), got {weight}")
            checked[domain][name] = weight
    return checked


def _checked_exclusive_targets(value: object) -> dict[str, list[str]]:
    """``nada_image_exclusive_of`` as {domain name: [other domain names]}, or a ValueError saying what is wrong."""
    checked = _checked_texts_by_domain("nada_image_exclusive_of", value, "the list of domains its image hinge acts against, e.g. {blue_skin: [freckles]}")
    for domain, targets in checked.items():
        if domain in targets:
            raise ValueError(f"training setting nada_image_exclusive_of: domain {domain!r} lists itself; list the domains whose drawings it must not move towards")
    return checked


def _checked_negative_prompts(value: object) -> dict[str, list[str]]:
    """``negative_prompts`` as {domain name: [non-blank prompts]}, or a ValueError saying what is wrong."""
    checked = _checked_texts_by_domain("negative_prompts", value, "the texts it must not draw, e.g. {eyepatch: [\"a portrait of a person wearing sunglasses\"]}")
    return {domain: list(dict.fromkeys(p.strip() for p in prompts)) for domain, prompts in checked.items()}


def _checked_texts_by_domain(setting: str, value: object, what: str) -> dict[str, list[str]]:
    """``value`` as {domain name: [non-blank texts, first of repeats]}, or a ValueError naming ``setting``."""
    usage = f"must map a domain name to {what}"
    if not isinstance(value, dict):
        raise ValueError(f"training setting {setting} {usage}, got {value!r}")
    checked = {}
    for domain, texts in value.items():
        if not isinstance(domain, str) or not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise ValueError(f"training setting {setting}: entry {domain!r} {usage} (a non-empty list of non-blank texts), got {texts!r}")
        checked[domain] = list(dict.fromkeys(texts))
    return checked


def _checked_setting(name: str, value: object, kind: object) -> object:
    """``value`` as the annotated ``kind`` (int, float, bool, str, tuple, Optional[...]), or a ValueError
    that names the setting: YAML's ``"no"`` or ``"0.1"`` strings must not pass as a bool or a number."""
    if get_origin(kind) is Union:  # Optional[X]
        if value is None:
            return None
        kind = next(k for k in get_args(kind) if k is not type(None))
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"training setting {name} must be true or false, got {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"training setting {name} must be an integer, got {value!r}")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise ValueError(f"training setting {name} must be a finite number, got {value!r}")
    if kind is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"training setting {name} must be a string, got {value!r}")
    if kind is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(_checked_setting(name, v, float) for v in value)
        raise ValueError(f"training setting {name} must be a list of numbers, got {value!r}")
    return value


class NonFiniteLossError(FloatingPointError):
    """A training loss became NaN or infinite; the step was not taken."""


@dataclass
class Guidance:
    """Frozen models, built once by the caller and passed in."""

    perceptual: PerceptualDistance
    clip: Optional[object] = None  # expander.guidance.clip.ClipGuidance, for nada
    teacher: Optional[object] = None  # diffusion teacher, for sds
    mystyle_targets: dict = field(default_factory=dict)  # domain name -> (images (N,3,R,R), w_inversions (N,D))


def _choose(items: list, k: int, rng: torch.Generator) -> list:
    """``k`` items drawn without replacement (all of them when there are fewer), in a stable order."""
    if len(items) <= k:
        return list(items)
    picks = torch.randperm(len(items), generator=rng)[:k].tolist()
    return [items[i] for i in sorted(picks)]


@dataclass
class _Group:
    """Latents of one domain in one step."""

    kind: str  # "train" (adaptation loss) or "replay" (held to the parent)
    domain: Domain
    w_domain: torch.Tensor  # (B, D) in the domain's repurposed subspace
    w_base: torch.Tensor  # (B, D) the same latents in the base subspace
    targets: Optional[torch.Tensor] = None  # (B, 3, R, R) mystyle reconstruction targets
    w_reference: Optional[torch.Tensor] = None  # (B, D) what NADA/SDS compare with; None = w_base
    partner: Optional[Domain] = None  # composition groups: the domain whose subspace is the reference

    @property
    def reference(self) -> torch.Tensor:
        return self.w_base if self.w_reference is None else self.w_reference


def gan_discriminator(model: ExpandedGenerator, real_sampler: Optional[RealSampler], config: ExpansionConfig) -> Optional[torch.nn.Module]:
    """The discriminator a run's GAN loss trains, or None when the loss is off: it needs real images, a
    weight and the model's discriminator (whether it is on is part of the run's resume signature)."""
    return model.discriminator if (real_sampler is not None and config.lambda_gan > 0) else None


def domain_signature(trained: Sequence[Domain], replayed: Sequence[Domain]) -> dict[str, list[dict]]:
    """What a state's weights were trained for: the trained domains (what each learns) and the replayed ones (where they live)."""
    return {
        "trained": [{k: getattr(d, k) for k in ("name", "direction", "method", "prompt", "source_prompt", "images", "alpha")} for d in trained],
        "replayed": [{k: getattr(d, k) for k in ("name", "direction", "alpha")} for d in replayed],
    }


def check_resumable(folder: str | Path, config: ExpansionConfig, domains: dict[str, list[dict]], run: dict[str, Any], processes: int = 1) -> None:
    """Raise a ValueError naming every difference between the run that saved the training state in
    ``folder`` and this one: its settings, ``domains`` (:func:`domain_signature`), ``run`` (what else
    defines it: guidance, parent, real images, whether the GAN loss is on) and process count. Callers
    check before loading guidance models, so a mismatch costs seconds; the trainer checks again."""
    info = read_json(Path(folder) / "state.json", what="training state").get("info", {})
    # JSON round trip, so tuples compare equal to the lists they were saved as
    now = json.loads(json.dumps({"config": asdict(config), "domains": domains, "run": run}, default=str))
    # domains and run: absent in states saved before this check
    saved_config, saved_domains, saved_run = info.get("config", {}), info.get("domains"), info.get("run", now["run"])
    # A setting the saved run did not have yet ran as its default does (a new setting starts as the old
    # behaviour): a resume that sets it otherwise, e.g. negative prompts added, is another training.
    defaults = json.loads(json.dumps(asdict(ExpansionConfig()), default=str))
    differences = setting_differences({**defaults, **saved_config}, now["config"], RESUMABLE_CHANGES)
    differences += [f"{name}: {saved_run.get(name)!r} in the state, {now['run'].get(name)!r} now" for name in sorted(set(saved_run) | set(now["run"])) if saved_run.get(name) != now["run"].get(name)]
    if saved_domains is not None:
        for kind in ("trained", "replayed"):
            saved_names, names = [e["name"] for e in saved_domains.get(kind, [])], [e["name"] for e in now["domains"][kind]]
            if saved_names != names:
                differences.append(f"{kind} domains: {', '.join(saved_names) or 'none'} in the state, {', '.join(names) or 'none'} now")
            elif saved_domains.get(kind) != now["domains"][kind]:
                differences.append(f"{kind} domains: their prompts, methods, directions or alphas differ")
    saved_processes = info.get("num_processes", 1)
    if saved_processes != processes:  # each rank draws its own latents: another count is another run
        differences.append(f"processes: {saved_processes} in the state, {processes} now (resume with the same accelerate launch)")
    if differences:
        raise ValueError(
            f"cannot resume from the training state in {folder}: it was saved by a run with other settings ("
            + "; ".join(differences)
            + "). Resume with the recipe that started it, or start over without --resume (the state is then replaced)"
        )
    saved_step = info.get("step", 0)
    if saved_step > config.steps:
        raise ValueError(f"cannot resume from the training state in {folder}: it is at step {saved_step}, past this run's {config.steps} steps; resume with at least {saved_step} steps, or start over without --resume")


class Expander:
    """Holds what one expansion run needs: the model, its frozen parent, optimizers, RNG, guidance.

    With ``accelerator``, the model is moved to its device, the synthesis network (and the
    discriminator) are wrapped for data-parallel training and each rank draws latents from
    ``seed + rank``; without it, everything runs in this process exactly as before.
    """

    def __init__(
        self,
        model: ExpandedGenerator,
        new_domains: list[Domain],
        guidance: Guidance,
        config: Optional[ExpansionConfig] = None,
        real_sampler: Optional[RealSampler] = None,
        accelerator: Optional["Accelerator"] = None,
        run_info: Optional[dict[str, Any]] = None,  # what else defines the run (e.g. the recipe's guidance): saved with the state, checked on resume
    ):
        self.model, self.guidance, self.real_sampler, self.accelerator = model, guidance, real_sampler, accelerator
        self.run_info = json.loads(json.dumps(run_info or {}, default=str))  # plain JSON (paths as text): saved and compared as is
        self.config = config = config or ExpansionConfig()
        new_names = [d.name for d in new_domains]
        missing = sorted(set(new_names) - set(model.domain_names))
        if missing:
            raise ValueError(f"domains {missing} must be added to the model (model.add_domain) before training")
        teacher_config = getattr(guidance.teacher, "config", None)  # a ScoreDistillation's; a duck-typed teacher has its own
        if is_dataclass(teacher_config) and any(d.method == "sds" for d in new_domains):
            # The run's settings are what the checkpoint records: a teacher built with others would train differently.
            wanted, built = asdict(config.sds_config()), asdict(teacher_config)
            differing = [f"{name}: {built.get(name)!r} in the teacher, {value!r} in the training settings" for name, value in wanted.items() if built.get(name, value) != value]
            if differing:
                raise ValueError(f"the SDS teacher was built with other settings than this run's ({'; '.join(differing)}); build it with ScoreDistillation(teacher, config.sds_config())")
        self.trained = [model.get_domain(n) for n in new_names]
        self.replayed = [d for d in model.domains if d.name not in new_names]
        check_run_domains(config, self.trained, model.generator.resolution)
        for domain in self.trained:
            _check_guidance(domain, guidance)
        check_teacher_prompts(self.trained, model.domains, guidance, config)
        if config.lambda_composed_edits > 0 and guidance.clip is None:
            raise ValueError("training setting lambda_composed_edits compares composed images in CLIP space and needs CLIP guidance: train at least one NADA domain in the run, or set it to 0")

        if accelerator is not None:
            model.to(accelerator.device)  # before the parent copy, so both live on this rank's device
        G = model.generator
        self.parent = copy.deepcopy(G).eval()  # frozen parent for replay
        self.parent.requires_grad_(False)
        G.requires_grad_(False)
        self.params = G.synthesis_parameters()  # the mapping network and the basis stay fixed
        for p in self.params:
            p.requires_grad_(True)
        self.optimizers = {"G": torch.optim.Adam(self.params, lr=config.lr, betas=config.betas)}
        self.modules: dict[str, torch.nn.Module] = {"G": G}
        self.D = gan_discriminator(model, real_sampler, config)
        if self.D is not None:
            self.D.requires_grad_(False)  # frozen for the generator's GAN loss; the discriminator step unfreezes it
            # Lazy R1 rescales Adam's hyper-parameters (StyleGAN2 appendix B).
            ratio = config.r1_every / (config.r1_every + 1)
            self.optimizers["D"] = torch.optim.Adam(self.D.parameters(), lr=config.lr * ratio, betas=tuple(b**ratio for b in config.betas))
            self.modules["D"] = self.D
        # Set from the step index each step (not a stateful scheduler): a resumed run needs nothing more.
        self.base_lrs = {name: [group["lr"] for group in optimizer.param_groups] for name, optimizer in self.optimizers.items()}
        self.synthesis = G.synthesis  # what the step calls; DDP-wrapped with an accelerator
        self.discriminator = self.D  # what the discriminator step calls; likewise
        rank = 0
        if accelerator is not None:
            rank = accelerator.process_index
            self.synthesis, self.optimizers["G"] = accelerator.prepare(SynthesisNetwork(G), self.optimizers["G"])
            if self.D is not None:
                self.D.requires_grad_(True)  # DDP syncs only what requires grad when it wraps
                self.discriminator, self.optimizers["D"] = accelerator.prepare(self.D, self.optimizers["D"])
                self.D.requires_grad_(False)  # frozen for the generator's GAN loss, as after any D step
        self.rng = torch.Generator().manual_seed(config.seed + rank)  # each rank its own share of latents
        self.step_index = 0

    # ---- state ------------------------------------------------------------------------------------

    def save_state(self, folder: str | Path) -> None:
        accelerator = self.accelerator
        info = {"step": self.step_index, "config": asdict(self.config), "domains": self._domain_signature(), "run": self._run_signature()}
        if accelerator is None:
            save_training_state(folder, self.modules, self.optimizers, {"rng": self.rng}, info)
            return
        generators = gather_generators(accelerator, self.rng)  # every rank's RNG; a collective
        if accelerator.is_main_process:  # the weights and optimizer moments are the same on every rank
            save_training_state(folder, self.modules, self.optimizers, generators, {**info, "num_processes": accelerator.num_processes})
        accelerator.wait_for_everyone()

    def load_state(self, folder: str | Path) -> None:
        """Continue from a state :meth:`save_state` wrote, after checking it belongs to this run: resuming
        with another recipe would silently mix two trainings (the weights fit any run of the same model)."""
        self.check_resumable(folder)
        self.step_index = load_training_state(folder, self.modules, self.optimizers, {"rng": self.rng})["step"]

    def _domain_signature(self) -> dict[str, list[dict]]:
        return domain_signature(self.trained, self.replayed)

    def _run_signature(self) -> dict[str, Any]:
        return {**self.run_info, "gan": self.D is not None}  # the GAN loss also needs real images, which no setting names

    def check_resumable(self, folder: str | Path) -> None:
        """Raise a ValueError naming every difference between the run that saved ``folder`` and this one."""
        processes = 1 if self.accelerator is None else self.accelerator.num_processes
        check_resumable(folder, self.config, self._domain_signature(), self._run_signature(), processes)

    # ---- one step ---------------------------------------------------------------------------------

    def _sample_w(self, n: int) -> torch.Tensor:
        z = torch.randn(n, self.model.generator.style_dim, generator=self.rng).to(self.model.basis.mean.device)
        with torch.no_grad():
            return self.model.generator.mapping(z)

    def _groups(self) -> list[_Group]:
        basis, config = self.model.basis, self.config
        groups = []
        for kind, domains, k in (("replay", self.replayed, config.replay_domains_per_step), ("train", self.trained, config.domains_per_step)):
            for domain in _choose(domains, k, self.rng):
                targets = None
                if kind == "train" and domain.method == "mystyle":
                    images, w_inverted = self.guidance.mystyle_targets[domain.name]
                    picks = torch.randint(len(images), (config.batch_size,), generator=self.rng)
                    w_base, targets = basis.project_base(w_inverted[picks]), images[picks]
                else:
                    size = config.replay_batch_size if kind == "replay" and config.replay_batch_size else config.batch_size
                    w_base = basis.project_base(self._sample_w(size))
                w_domain = w_base + self._offset(domain)
                groups.append(_Group(kind, domain, w_domain, w_base, targets))
        groups += self._composition_groups([g.domain for g in groups if g.kind == "train"])
        return groups

    def _offset(self, domain: Domain) -> torch.Tensor:
        """alpha_k * v_k: (D,)."""
        return self.model.basis.offset(self.model.shifts_for({domain.name: 1.0}))

    def _composition_groups(self, trained_now: list[Domain]) -> list[_Group]:
        """Groups whose latents carry this step's domain i on top of another domain j's subspace.

        The reference is the same latent in j's subspace, so the loss asks for i's edit *relative to
        j*: composing two domains then shows both. Only NADA/SDS (they have a reference image).
        With ``composition_both_ways``, a second group on the *same* composed latents asks for j's
        edit relative to i's subspace (when j has NADA/SDS guidance), so neither edit erases the other.
        """
        candidates = [d for d in trained_now if d.method in ("nada", "sds")]
        if not candidates or len(self.model.domains) < 2:  # nothing to compose: draw nothing from the RNG
            return []
        groups = []
        for _ in range(self.config.compositions_per_step):
            domain = candidates[int(torch.randint(len(candidates), (), generator=self.rng))]
            others = [d for d in self.model.domains if d.name != domain.name]
            partner = others[int(torch.randint(len(others), (), generator=self.rng))]
            w_base = self.model.basis.project_base(self._sample_w(self.config.batch_size))  # (B, D)
            w_partner = w_base + self._offset(partner)
            w_composed = w_partner + self._offset(domain)
            groups.append(_Group("train", domain, w_composed, w_base, w_reference=w_partner, partner=partner))
            if self.config.composition_both_ways and self._has_guidance(partner):
                groups.append(_Group("train", partner, w_composed, w_base, w_reference=w_base + self._offset(domain), partner=domain))
        return groups

    def _composed_pairs(self, groups: list[_Group]) -> list[tuple[_Group, Domain, torch.Tensor, torch.Tensor]]:
        """(group of domain i, partner j, w + a_j v_j, w + a_i v_i + a_j v_j) for the composed-edits
        loss, on the latents of this step's trained groups with a reference image (so w's image is
        rendered already); each (B, D). Draws from the RNG only when the loss is on."""
        candidates = [g for g in groups if g.kind == "train" and g.partner is None]
        if self.config.lambda_composed_edits <= 0 or not candidates or len(self.model.domains) < 2:
            return []
        pairs = []
        for _ in range(self.config.composed_pairs_per_step):
            group = candidates[int(torch.randint(len(candidates), (), generator=self.rng))]
            others = [d for d in self.model.domains if d.name != group.domain.name]
            partner = others[int(torch.randint(len(others), (), generator=self.rng))]
            offset = self._offset(partner)
            pairs.append((group, partner, group.w_base + offset, group.w_domain + offset))
        return pairs

    def _has_guidance(self, domain: Domain) -> bool:
        """Whether a reference-based loss (NADA/SDS) can be computed for ``domain`` in this run."""
        return domain.method in ("nada", "sds") and _missing_guidance(domain, self.guidance) is None

    def losses(self) -> dict[str, torch.Tensor]:
        """Sample latents, run ONE synthesis call, return the weighted losses of this step (no optimizer steps)."""
        return self._losses_and_fakes()[0]

    def _losses_and_fakes(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """:meth:`losses`, and the base-subspace images the discriminator step takes as fakes (Nb, 3, R, R)."""
        config, guidance = self.config, self.guidance
        w_base = self.model.basis.project_base(self._sample_w(config.base_batch_size))  # (Nb, D)
        groups = self._groups()
        # NADA/SDS compare each domain image with the same latent's base image (appendix D.2).
        needs_reference = [g for g in groups if g.kind == "train" and g.domain.method in ("nada", "sds")]
        # Latents shared by several groups (both sides of a composition) are rendered once.
        unique_latents = list({id(g.w_domain): g.w_domain for g in groups}.values())
        pairs = self._composed_pairs(needs_reference)
        pair_latents = [w for _, _, w_partner, w_composed in pairs for w in (w_partner, w_composed)]
        batches = [w_base] + unique_latents + [g.reference for g in needs_reference] + pair_latents
        images = self.synthesis(torch.cat(batches)).split([len(b) for b in batches])  # ONE batched call
        base_images = images[0]
        rendered = dict(zip((id(w) for w in unique_latents), images[1 : 1 + len(unique_latents)]))
        group_images = [rendered[id(g.w_domain)] for g in groups]
        after_references = 1 + len(unique_latents) + len(needs_reference)
        references = dict(zip((id(g) for g in needs_reference), images[1 + len(unique_latents) : after_references]))
        pair_images = images[after_references:]  # partner, composed, per pair

        weighted: dict[str, torch.Tensor] = {}

        def add(name: str, value: torch.Tensor) -> None:
            weighted[name] = weighted.get(name, 0) + value

        # Replay: the base subspace and the replayed domains' subspaces stay where the parent had them.
        replay_pairs = [(w_base, base_images)] + [(g.w_domain, img) for g, img in zip(groups, group_images) if g.kind == "replay"]
        replay_w = torch.cat([w for w, _ in replay_pairs])
        with torch.no_grad():
            parent_images = self.parent.synthesis(replay_w)
        loss_l2, loss_perceptual = loss_replay(torch.cat([img for _, img in replay_pairs]), parent_images, guidance.perceptual)
        add("loss_replay_l2", config.lambda_replay_l2 * loss_l2)
        add("loss_replay_perceptual", config.lambda_replay_perceptual * loss_perceptual)

        # Adaptation losses, summed over this step's trained domains: each domain's pull against
        # replay does not shrink when more domains share a step (measured: averaging them, 10 joint
        # domains reached 51.6% mean success in 300 steps, summing 57.5%).
        nada_groups = [(g, img) for g, img in zip(groups, group_images) if g.kind == "train" and g.domain.method == "nada"]
        features = {id(g): nada_image_features(guidance.clip, img, references[id(g)], self.rng) for g, img in nada_groups}  # per CLIP: (V*B, D) x 2
        directions = {id(g): nada_image_directions(guidance.clip, img, references[id(g)], features=features[id(g)]) for g, img in nada_groups}  # per CLIP: (V*B, D)
        drawn = _directions_by_domain([(g, directions[id(g)]) for g, _ in nada_groups]) if any(config.weight("lambda_nada_image_exclusive", g.domain.name) > 0 for g, _ in nada_groups) else {}
        for group, domain_images in zip(groups, group_images):
            domain = group.domain
            if group.kind != "train":
                continue
            weight = partial(config.weight, domain=domain.name)  # this domain's loss weights
            if domain.method == "nada":
                source = domain.source_prompt or config.source_prompt
                contrast = [d.prompt for d in self.model.domains if d.method == "nada" and d.name != domain.name and d.prompt] if (config.nada_contrast > 0 or config.nada_dual_ridge is not None or weight("lambda_nada_exclusive") > 0) else []
                own = directions[id(group)]
                loss = loss_nada(guidance.clip, domain_images, references[id(group)], source, domain.prompt, contrast, self.rng, config.nada_contrast, weight("lambda_nada_exclusive"), image_directions=own, dual_ridge=config.nada_dual_ridge)
                add("loss_nada", weight("lambda_nada") * loss)
                if weight("lambda_nada_consistency") > 0:
                    consistency = loss_nada_consistency(features[id(group)], len(domain_images), config.nada_consistency_temperature)
                    add("loss_nada_consistency", weight("lambda_nada_consistency") * consistency)
                if weight("lambda_nada_image_exclusive") > 0:
                    targets = config.nada_image_exclusive_of.get(domain.name)
                    others = [per_clip for name, per_clip in drawn.items() if name != domain.name and (targets is None or name in targets)]
                    add("loss_nada_image_exclusive", weight("lambda_nada_image_exclusive") * loss_nada_image_exclusive(guidance.clip, own, others, source, domain.prompt))
                negatives = config.negative_prompts.get(domain.name)
                if negatives:
                    add("loss_nada_negative", weight("lambda_nada_negative") * loss_nada_negative(guidance.clip, own, source, domain.prompt, negatives))
            elif domain.method == "sds":
                # On top of another text domain, the teacher is asked for both prompts at once (composed guidance).
                prompts = [domain.prompt] + ([group.partner.prompt] if group.partner is not None and group.partner.method in ("nada", "sds") and group.partner.prompt else [])
                # A composed group asks for its partner's prompt: a negative naming it would cancel that.
                negatives = [n for n in config.negative_prompts.get(domain.name, ()) if not any(same_text(n, p) for p in prompts)]
                add("loss_sds", weight("lambda_sds") * guidance.teacher.loss(domain_images, references[id(group)], prompts if len(prompts) > 1 else domain.prompt, self.rng, negatives))
            elif domain.method == "mystyle":
                add("loss_mystyle", weight("lambda_mystyle") * loss_mystyle(domain_images, group.targets, guidance.perceptual))
            if weight("lambda_lowpass_keep") > 0 and id(group) in references:  # NADA/SDS: edits of a base image
                add("loss_lowpass_keep", weight("lambda_lowpass_keep") * loss_lowpass_change(domain_images, references[id(group)], config.lowpass_size))
            if weight("lambda_smooth_edit") > 0 and id(group) in references:
                add("loss_smooth_edit", weight("lambda_smooth_edit") * loss_edit_detail(domain_images, references[id(group)], config.smooth_edit_size))

        for index, (group, _, _, _) in enumerate(pairs):
            partner_images, composed_images = pair_images[2 * index], pair_images[2 * index + 1]
            domain_images = rendered[id(group.w_domain)]
            loss = loss_composed_edits(guidance.clip, composed_images, domain_images, partner_images, references[id(group)], self.rng)
            add("loss_composed_edits", config.lambda_composed_edits * loss)  # summed over pairs, like the adaptation losses

        if self.D is not None:
            add("loss_gan", config.lambda_gan * loss_g_nonsaturating(self.D(base_images)))
        return weighted, base_images

    def _stop_diverged(self, what: str) -> None:
        raise NonFiniteLossError(
            f"training stopped at step {self.step_index}: {what}. Nothing was updated at this step "
            f"and the training state saved last (every checkpoint_every = {self.config.checkpoint_every} steps) is intact; a resume would "
            "reach the same step again, so start over with a lower lr (or, for SDS domains, an sds_grad_clip) or with lower loss weights"
        )

    def _discriminator_step(self, fake_images: torch.Tensor) -> None:
        D, config = self.discriminator, self.config
        real = self.real_sampler(len(fake_images), self.rng).to(fake_images.device)
        D.requires_grad_(True)
        loss = loss_d_logistic(D(real), D(fake_images))
        if self.step_index % config.r1_every == 0:
            loss = loss + config.r1_gamma / 2 * config.r1_every * loss_r1(D, real)
        value = float(loss.detach())
        if self.accelerator is not None:
            value = float(self.accelerator.gather(loss.detach().reshape(1)).sum())  # NaN on any rank: NaN on every rank
        if not math.isfinite(value):  # before the discriminator's weights (and a saved state) take it
            D.requires_grad_(False)
            self._stop_diverged(f"the discriminator's loss = {value}")
        self.optimizers["D"].zero_grad(set_to_none=True)
        if self.accelerator is None:
            loss.backward()
        else:
            self.accelerator.backward(loss)
        self.optimizers["D"].step()
        D.requires_grad_(False)

    def step(self) -> dict[str, float]:
        scale = self.config.lr_scale(self.step_index)
        for name, optimizer in self.optimizers.items():
            for group, base_lr in zip(optimizer.param_groups, self.base_lrs[name]):
                group["lr"] = base_lr * scale
        losses, fakes = self._losses_and_fakes()
        values = {k: float(v.detach()) for k, v in losses.items()}
        diverged = {k: v for k, v in values.items() if not math.isfinite(v)}
        if self.accelerator is not None:  # every rank stops together: one alone would leave the others waiting in DDP
            flags = self.accelerator.gather(torch.tensor([float(bool(diverged))], device=self.accelerator.device))  # (ranks,)
            if flags.sum() > 0 and not diverged:
                diverged = {"another process's losses": math.nan}
        if diverged:  # one NaN step would reach every synthesis weight, and the next saved state
            self._stop_diverged(", ".join(f"{k} = {v}" for k, v in diverged.items()))
        if self.D is not None:
            self._discriminator_step(fakes.detach())  # the generator's GAN loss above used D before this update
        optimizer = self.optimizers["G"]
        optimizer.zero_grad(set_to_none=True)
        if self.accelerator is None:
            sum(losses.values()).backward()
        else:
            self.accelerator.backward(sum(losses.values()))  # DDP averages the gradients over ranks
        optimizer.step()
        self.step_index += 1
        return values

    def finish(self) -> ExpandedGenerator:
        for domain in self.trained:
            domain.steps += self.step_index
        self.model.generator.requires_grad_(False)
        return self.model.eval()


def _directions_by_domain(groups_and_directions: list[tuple[_Group, list[torch.Tensor]]]) -> dict[str, list[torch.Tensor]]:
    """Domain name (in first-seen order) -> its groups' per-CLIP image directions concatenated: (N, D) each."""
    merged: dict[str, list[list[torch.Tensor]]] = {}
    for group, per_clip in groups_and_directions:
        merged.setdefault(group.domain.name, []).append(per_clip)
    return {name: [torch.cat(parts) for parts in zip(*lists)] for name, lists in merged.items()}


def check_teacher_prompts(trained: list[Domain], domains: list[Domain], guidance: Guidance, config: ExpansionConfig) -> None:
    """Ask the SDS teacher, before the first step, for every prompt the run will condition it on: the
    SDS domains' and their negative prompts, and with composition groups their partners' too, which
    the first step drawing them would otherwise find unknown (a closed-vocabulary teacher such as the
    world's; see check_prompt)."""
    check_prompt = getattr(guidance.teacher, "check_prompt", None)
    sds = [d for d in trained if d.method == "sds"]
    if check_prompt is None or not sds:
        return
    for domain in sds:
        try:
            check_prompt(domain.prompt)
        except ValueError as err:
            raise ValueError(f"SDS domain {domain.name!r}: {err}") from None
        for negative in config.negative_prompts.get(domain.name, ()):
            try:
                check_prompt(negative)
            except ValueError as err:
                raise ValueError(f"negative prompt {negative!r} of SDS domain {domain.name!r}: {err}") from None
    if config.compositions_per_step == 0:
        return
    for partner in [d for d in domains if d.method in ("nada", "sds") and d.prompt and d not in sds]:
        try:
            check_prompt(partner.prompt)
        except ValueError as err:
            raise ValueError(
                f"domain {partner.name!r} is composed with SDS domains (compositions_per_step {config.compositions_per_step}), which asks the SDS teacher for its prompt too: {err}; "
                "set compositions_per_step: 0, or give it a prompt the teacher knows"
            ) from None


def _missing_guidance(domain: Domain, guidance: Guidance) -> Optional[str]:
    """Why ``domain``'s training loss cannot be computed with ``guidance`` (None when it can)."""
    if domain.method in ("nada", "sds") and not (domain.prompt or "").strip():
        return f"domain {domain.name!r} needs a non-empty prompt"
    if domain.method == "nada" and guidance.clip is None:
        return f"domain {domain.name!r} uses nada but no CLIP guidance was given"
    if domain.method == "sds" and guidance.teacher is None:
        return f"domain {domain.name!r} uses sds but no diffusion teacher was given"
    if domain.method == "mystyle" and domain.name not in guidance.mystyle_targets:
        return f"domain {domain.name!r} uses mystyle but has no inverted target images"
    if domain.method == "manual":
        return f"domain {domain.name!r} is 'manual': it has no training loss"
    return None


def _check_guidance(domain: Domain, guidance: Guidance) -> None:
    problem = _missing_guidance(domain, guidance)
    if problem is not None:
        raise ValueError(problem)


def expand(
    model: ExpandedGenerator,
    new_domains: list[Domain],
    guidance: Guidance,
    config: Optional[ExpansionConfig] = None,
    state_dir: Optional[str | Path] = None,
    resume: bool = False,
    real_sampler: Optional[RealSampler] = None,
    progress: bool = True,
    accelerator: Optional["Accelerator"] = None,
    run_info: Optional[dict[str, Any]] = None,
) -> ExpandedGenerator:
    """Train ``new_domains`` (already registered in ``model``) into ``model`` in place and return it.

    Every other domain of ``model`` is replayed (held in place). With ``state_dir``, the full training
    state is saved every ``checkpoint_every`` steps, and ``resume=True`` continues from it exactly; a
    state saved by another run (other settings but ``steps`` and ``checkpoint_every``, other domains,
    another ``run_info``, e.g. the recipe's guidance) is refused with what differs.

    With ``accelerator`` (call this on every process of an ``accelerate launch``), each rank trains on
    its own latents and the gradients are averaged; the main process writes the state (every rank's
    RNG included, so a resume with the same number of processes is exact) and shows the progress bar.
    """
    trainer = Expander(model, new_domains, guidance, config, real_sampler, accelerator=accelerator, run_info=run_info)
    config = trainer.config
    if resume and state_dir is not None and (Path(state_dir) / "state.json").exists():
        trainer.load_state(state_dir)
        if accelerator is not None:
            restore_rank_rng(state_dir, accelerator.process_index, accelerator.num_processes, trainer.rng)
        logger.info("resumed expansion at step %d", trainer.step_index)
    elif resume:
        raise ValueError(f"resume=True, but there is no training state in {state_dir} to continue; start without resume")
    is_main = accelerator is None or accelerator.is_main_process
    bar = tqdm(total=config.steps, initial=trainer.step_index, disable=not (progress and is_main), desc="expand")
    while trainer.step_index < config.steps:
        losses = trainer.step()
        bar.update(1)
        bar.set_postfix({k.replace("loss_", ""): f"{v:.3f}" for k, v in losses.items()})
        if state_dir is not None and (trainer.step_index % config.checkpoint_every == 0 or trainer.step_index == config.steps):
            trainer.save_state(state_dir)
    bar.close()
    return trainer.finish()
