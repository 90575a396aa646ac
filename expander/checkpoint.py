"""The expanded generator: one checkpoint holding the source domain and every new domain.

On disk (a folder, or a Hugging Face Hub repo with the same files)::

    config.json              architecture, alpha, base model, format version
    model.safetensors        generator.* (rosinality keys), latent_avg, basis.* (SeFA basis, dormancy),
                             anchors.K (MyStyle domains: the subject's inversions, sampled by convex combination)
    domains.json             the domains registry: name -> direction, method, prompt/images, ...
    training.json            optional: every training run that made this checkpoint (domains trained and
                             replayed, guidance, all training settings incl. per-domain loss weights)
    discriminator.safetensors  optional, rosinality keys; needed only to keep training with a GAN loss
    README.md                generated model card (+ samples.png when the model is small enough)

Writes are atomic (the folder is assembled beside the target and renamed into place) and loading
is strict: every key must be present and no unknown key may appear.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import torch
from huggingface_hub import PyTorchModelHubMixin
from safetensors.torch import save_file
from torch import nn

from .domains import BASE_DOMAIN, Domain, is_valid_alpha, unknown_domain_error, validate_domains
from .generators.stylegan2 import Discriminator, Generator, StyleGAN2Config, check_noise_mode
from .subspace.basis import LatentBasis, sefa
from .utils.io import atomic_path, read_json, read_safetensors, state_mismatches, weight_defect

FORMAT_NAME = "expander.expanded_generator"
FORMAT_VERSION = 1
# Every key of config.json (ExpandedGenerator.config_dict); loading refuses a file with others or fewer.
CONFIG_KEYS = ("format", "format_version", "generator", "alpha", "num_dormant", "base_model", "description", "has_discriminator")
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
DOMAINS_FILE = "domains.json"
DISCRIMINATOR_FILE = "discriminator.safetensors"
TRAINING_FILE = "training.json"
TRAINING_FORMAT = "expander.training_log"
SAMPLES_FILE = "samples.png"
# Everything save_pretrained writes (README.md is the model card): a save replaces these and keeps the rest.
CHECKPOINT_FILES = (CONFIG_FILE, WEIGHTS_FILE, DOMAINS_FILE, DISCRIMINATOR_FILE, TRAINING_FILE, SAMPLES_FILE, "README.md")
ANCHORS_PREFIX = "anchors."  # + the domain's direction: directions are unique and stable, names may change
MAPPING_CHUNK = 4096  # latents mapped at once by random_latents (n up to it: one call, as always)
ANCHORS_PER_SAMPLE = 3  # anchors mixed per sample of an anchored domain (see ExpandedGenerator.sampling_latents)
# Largest |strength| a sample or traversal accepts: 1 is the trained domain; far beyond a few the images
# are noise, and near float32's range alpha * strength overflows into all-NaN images with no error.
MAX_STRENGTH = 100.0


class CheckpointError(ValueError):
    """A checkpoint folder that is missing files, has the wrong format, or does not match its config."""


def read_domains(folder: str | os.PathLike) -> list[Domain]:
    """The domains a checkpoint folder's domains.json lists, each entry checked (a CheckpointError if not)."""
    path = Path(folder) / DOMAINS_FILE
    registry = read_json(path, what="domains registry")
    if not isinstance(registry, dict) or not isinstance(registry.get("domains"), list):
        raise CheckpointError(f"invalid domains registry {path}: expected {{\"domains\": [...]}}, got {str(registry)[:80]}; restore the file or download the model again")
    try:
        return [Domain.from_dict(entry) for entry in registry["domains"]]
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:  # AttributeError: an entry that is not an object
        raise CheckpointError(f"invalid domains registry {path}: {err}") from None


def check_strength(strength: Any, what: str = "strength") -> float:
    """``strength`` as a float, or a ValueError saying the range (finite, at most MAX_STRENGTH either way)."""
    value = float(strength)
    if not math.isfinite(value) or abs(value) > MAX_STRENGTH:
        raise ValueError(f"{what} must be a number from -{MAX_STRENGTH:g} to {MAX_STRENGTH:g} (0 = base, 1 = the domain), got {strength!r}")
    return value


def check_keeps_domains(folder: str | os.PathLike, kept: Iterable[str], overwrite: bool = False) -> None:
    """Refuse to write a model into ``folder`` when the model already there has domains the new one
    (with domains ``kept``) lacks: that would be another model, whose training is lost silently. The
    same model written again (a re-run, an add-domain in place) keeps its domains and passes; so does
    any model with ``overwrite``. A folder whose config.json is not an expander model's (a transformers
    or diffusers model, a broken file) is refused likewise. Call it before long work."""
    folder = Path(folder)
    if overwrite or not (folder / CONFIG_FILE).is_file():
        return
    hint = "write to another folder (--out), or pass --overwrite to replace it"
    try:
        config = read_json(folder / CONFIG_FILE, what="model config")
    except ValueError:
        config = None
    if not isinstance(config, dict) or config.get("format") != FORMAT_NAME:  # a transformers or diffusers folder, or a broken one
        kind = f"format {config.get('format')!r}" if isinstance(config, dict) and config.get("format") else "a config.json that is not an expander model's"
        raise ValueError(
            f"{folder} holds something other than an expander model ({kind}), whose files writing there would replace; write to a new or empty folder (--out), "
            "or pass --overwrite to write the model's files over that folder's config.json and model.safetensors (its other files stay, beside the model)"
        )
    try:
        names = [domain.name for domain in read_domains(folder)] if (folder / DOMAINS_FILE).exists() else []
    except ValueError:
        raise ValueError(f"{folder} holds a model whose {DOMAINS_FILE} cannot be read, so writing there may lose its domains; {hint}") from None
    lost = [name for name in names if name not in set(kept)]
    if lost:
        raise ValueError(f"{folder} holds another model, with domains {lost} that the one written there would not have; {hint}")


class ExpandedGenerator(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="expander",
    tags=["domain-expansion", "stylegan2", "gan"],
    repo_url="https://github.com/expander-ai/expander",
):
    """A StyleGAN2 generator + its SeFA latent basis + the registry of repurposed directions.

    Args:
        generator: a :class:`StyleGAN2Config` as a dict (``StyleGAN2Config.to_dict()``).
        alpha: default distance of repurposed subspaces from the base subspace (paper: 20 for a 512-d W).
        num_dormant: how many of the least significant directions count as dormant (free for new domains).
        base_model: where the parent generator came from (Hub id, file, or "expander/world").
        description: one line for the model card.
    """

    def __init__(self, generator: dict, alpha: float = 20.0, num_dormant: Optional[int] = None, base_model: str = "", description: str = ""):
        super().__init__()
        self.generator = Generator(StyleGAN2Config.from_dict(dict(generator)))
        self.basis = LatentBasis(self.generator.style_dim)
        self.discriminator: Optional[Discriminator] = None
        if not is_valid_alpha(alpha):
            raise ValueError(f"alpha must be a positive finite number (the distance of repurposed subspaces from the base one, e.g. 20), got {alpha!r}")
        self.alpha = float(alpha)
        self.num_dormant = int(num_dormant) if num_dormant is not None else self.generator.style_dim // 2
        if not 0 < self.num_dormant <= self.generator.style_dim:
            raise ValueError(f"num_dormant must be in 1..{self.generator.style_dim}, got {num_dormant}")
        self.base_model = base_model
        self.description = description
        self._domains: list[Domain] = []
        # direction -> (K, D) anchor latents in W; a domain with anchors is sampled from their convex hull
        self._anchors: dict[int, torch.Tensor] = {}
        # One entry per training run that made this checkpoint, oldest first (see record_training).
        self._training_log: list[dict[str, Any]] = []

    # ---- construction -----------------------------------------------------------------------------

    @classmethod
    def from_generator(cls, generator: Generator, discriminator: Optional[Discriminator] = None, alpha: float = 20.0, num_dormant: Optional[int] = None, base_model: str = "", description: str = "") -> "ExpandedGenerator":
        """Wrap a pretrained generator: copy its weights and compute the SeFA basis (no domains yet)."""
        model = cls(generator.config.to_dict(), alpha=alpha, num_dormant=num_dormant, base_model=base_model, description=description)
        model.generator.load_state_dict(generator.state_dict(), strict=True)
        model.generator.style.w_avg.copy_(generator.w_avg)
        directions, singular_values = sefa(model.generator.style_affine_weights().values())
        model.basis.directions.copy_(directions)
        model.basis.singular_values.copy_(singular_values)
        model.basis.mean.copy_(generator.w_avg)
        if discriminator is not None:
            model.discriminator = Discriminator(discriminator.config)
            model.discriminator.load_state_dict(discriminator.state_dict(), strict=True)
        return model

    # ---- domains ----------------------------------------------------------------------------------

    @property
    def domains(self) -> tuple[Domain, ...]:
        return tuple(self._domains)

    @property
    def domain_names(self) -> list[str]:
        return [d.name for d in self._domains]

    def set_domains(self, domains: Iterable[Domain]) -> None:
        """Replace the registry (validated) and re-pin the base subspace to the new repurposed set."""
        domains = validate_domains(domains, self.generator.style_dim)
        self._domains = list(domains)
        self.basis.set_repurposed(d.direction for d in domains)
        directions = {d.direction for d in domains}
        self._anchors = {k: v for k, v in self._anchors.items() if k in directions}  # a removed domain takes its anchors along

    def set_anchors(self, name: str, anchors: Optional[torch.Tensor]) -> None:
        """Make domain ``name`` sample from the convex hull of ``anchors`` (K, D) in W (``None`` removes them).

        MyStyle domains are personalised priors: their subject lives near the inversions of the
        subject's photos, not at random latents (Nitzan et al. 2022 sample inside the inversions'
        convex hull). The anchors are stored in the checkpoint and used by :meth:`sampling_latents`.
        """
        domain = self.get_domain(name)
        if anchors is None:
            self._anchors.pop(domain.direction, None)
            return
        anchors = torch.as_tensor(anchors, dtype=torch.float32)
        if anchors.ndim != 2 or anchors.shape[1] != self.generator.style_dim or len(anchors) == 0:
            raise ValueError(f"anchors of domain {name!r} must have shape (K >= 1, {self.generator.style_dim}), got {tuple(anchors.shape)}")
        if not torch.isfinite(anchors).all():
            raise ValueError(f"anchors of domain {name!r} contain NaN or infinite values")
        self._anchors[domain.direction] = anchors.detach().to(self.basis.mean.device).clone()

    def anchors(self, name: str) -> Optional[torch.Tensor]:
        """The anchor latents (K, D) of domain ``name``, or ``None`` when it samples random latents."""
        return self._anchors.get(self.get_domain(name).direction)

    def get_domain(self, name: str) -> Domain:
        for domain in self._domains:
            if domain.name == name:
                return domain
        raise unknown_domain_error(name, self.domain_names)

    def domain_alpha(self, domain: Domain) -> float:
        return float(domain.alpha) if domain.alpha is not None else self.alpha

    def dormant_directions(self) -> list[int]:
        """The ``num_dormant`` most dormant directions, most dormant first."""
        return self.basis.dormant_order()[: self.num_dormant]

    def free_directions(self) -> list[int]:
        """Dormant directions no domain uses yet, most dormant first."""
        taken = {d.direction for d in self._domains}
        return [k for k in self.dormant_directions() if k not in taken]

    def add_domain(self, domain: Domain, force: bool = False, reserved: Iterable[int] = ()) -> Domain:
        """Register a domain; ``direction=-1`` picks the most dormant free direction not in ``reserved``.

        ``reserved``: directions that other domains of the same batch ask for explicitly, so an
        automatic pick listed before them cannot take them. A direction already taken, or one that
        is not dormant, is refused unless ``force``.
        """
        if domain.name in self.domain_names:
            raise ValueError(f"the model already has a domain named {domain.name!r}; choose another name")
        if domain.direction == -1:
            reserved = set(reserved)
            free = [k for k in self.free_directions() if k not in reserved]
            if not free:
                raise ValueError(f"all {self.num_dormant} dormant directions are taken; name a non-dormant direction and force it (--direction K --force on the command line, force=True in Python), knowing it changes the source domain")
            domain.direction = free[0]
        self.basis.check_index(domain.direction)
        taken = {d.direction: d.name for d in self._domains}
        if domain.direction in taken:
            raise ValueError(f"direction {domain.direction} is already used by domain {taken[domain.direction]!r}; pick a free one (free: {self.free_directions()[:8]}...)")
        if domain.direction not in self.dormant_directions() and not force:
            raise ValueError(
                f"direction {domain.direction} is not dormant (the dormant ones are the last {self.num_dormant} by the dormancy curve); "
                "repurposing it would change the source domain. Use a free dormant direction (leave the direction out to get one), or force it if you mean it (--force on the command line, force=True in Python)."
            )
        self.set_domains(self._domains + [domain])
        return domain

    # ---- latents and sampling ---------------------------------------------------------------------

    def shifts_for(self, strengths: dict[str, float]) -> dict[int, float]:
        """{domain name: strength} -> {direction: alpha * strength}; 'base' contributes nothing."""
        shifts: dict[int, float] = {}
        for name, strength in strengths.items():
            if name == BASE_DOMAIN:
                continue
            domain = self.get_domain(name)
            shifts[domain.direction] = self.domain_alpha(domain) * check_strength(strength, f"strength of {name!r}")
        return shifts

    def random_latents(self, n: int, seed: int = 0, truncation_psi: float = 1.0) -> torch.Tensor:
        """Mapped w (n, D) from seeded z (the same seed gives the same identities in every domain)."""
        rng = torch.Generator().manual_seed(int(seed))
        # Row i of z is the same whatever n (torch draws normals 16 at a time, and StyleGAN2's style_dim is a multiple of 16).
        z = torch.randn(n, self.generator.style_dim, generator=rng).to(self.basis.mean)  # the model's device and dtype
        # Mapped in chunks so a large n holds (n, D) twice, not the MLP's activations for all of it at once.
        return torch.cat([self.generator.mapping(chunk, truncation_psi=truncation_psi) for chunk in z.split(MAPPING_CHUNK)])

    def sampling_latents(self, domain: str, n: int, seed: int = 0, truncation_psi: float = 1.0) -> torch.Tensor:
        """The w (n, D) a domain is sampled from: :meth:`random_latents`, or for a domain with anchors
        (MyStyle), convex combinations of ``ANCHORS_PER_SAMPLE`` random anchors with Dirichlet(1) weights:
        new poses and expressions of the subject between its photos (Nitzan et al. 2022, Sec. 4)."""
        anchors = None if domain == BASE_DOMAIN else self.anchors(domain)
        if anchors is None:
            return self.random_latents(n, seed, truncation_psi)
        anchors = anchors.to(self.generator.w_avg)  # Module.to does not move or cast this plain dict
        rng = torch.Generator().manual_seed(int(seed))
        k = min(ANCHORS_PER_SAMPLE, len(anchors))
        # One row of uniforms per sample, so sample i is the same whatever n (as random_latents' rows are).
        uniforms = torch.rand(n, len(anchors) + k, generator=rng)  # (n, A + k)
        picks = uniforms[:, : len(anchors)].argsort(dim=1)[:, :k]  # (n, k) distinct anchors per sample
        weights = -uniforms[:, len(anchors) :].clamp_min(1e-12).log()  # (n, k) Exp(1) ...
        weights = weights / weights.sum(dim=1, keepdim=True)  # ... normalised = Dirichlet(1): uniform on the simplex
        w = torch.einsum("nk,nkd->nd", weights.to(anchors), anchors[picks.to(anchors.device)])  # (n, k) x (n, k, D) -> (n, D)
        if truncation_psi != 1.0:  # the same truncation as Generator.mapping
            w = self.generator.w_avg.lerp(w, truncation_psi)
        return w

    def domain_latents(self, w: torch.Tensor, strengths: dict[str, float]) -> torch.Tensor:
        """Move w into the (composed) repurposed subspace: project to base, add alpha * s * v_k."""
        return self.basis.repurposed_latent(w, self.shifts_for(strengths))

    @torch.no_grad()
    def sample(
        self,
        domain: str = BASE_DOMAIN,
        n: int = 16,
        seed: int = 0,
        strength: float = 1.0,  # 0 = base subspace, 1 = trained domain, in between = traversal
        compose: Sequence[str] = (),  # extra domains added at full strength
        truncation_psi: float = 1.0,
        noise_mode: str = "const",
        batch_size: int = 32,
    ) -> torch.Tensor:
        """Images (n, 3, R, R) in [-1, 1] from ``domain`` (``'base'`` = the source domain); all of
        :meth:`sample_batches` at once."""
        return torch.cat(list(self.sample_batches(domain, n, seed, strength, compose, truncation_psi, noise_mode, batch_size)))

    def sample_batches(
        self,
        domain: str = BASE_DOMAIN,
        n: int = 16,
        seed: int = 0,
        strength: float = 1.0,
        compose: Sequence[str] = (),
        truncation_psi: float = 1.0,
        noise_mode: str = "const",
        batch_size: int = 32,
    ) -> Iterator[torch.Tensor]:
        """The images of :meth:`sample` (same arguments; ``batch_size`` changes them only by float rounding) as batches
        (<= batch_size, 3, R, R) in [-1, 1], rendered as they are taken: the latents (n, D) are mapped
        at the call, and one batch of images is held at a time, so tens of thousands of images (for a
        Fréchet distance, say) fit in memory. Image i is the same whatever ``n``. Arguments are checked
        here, at the call, not when the first batch is taken."""
        if n < 1 or batch_size < 1:
            raise ValueError(f"n and batch_size must be at least 1, got n={n}, batch_size={batch_size}")
        if domain in compose:
            raise ValueError(f"{domain!r} is both the domain and in compose; list each domain once (its strength is {strength:g})")
        if domain == BASE_DOMAIN and strength != 1.0:
            raise ValueError(f"strength moves along a domain's direction, and the source domain {BASE_DOMAIN!r} has none; sample a domain with strength {strength:g}, or base without it")
        check_noise_mode(noise_mode)  # synthesis would check it only at the first batch
        strengths = {domain: strength}
        for extra in compose:
            strengths[extra] = 1.0
        named = [name for name in strengths if name != BASE_DOMAIN]
        for name in named:
            self.get_domain(name)  # fail before any work on an unknown name
        # A subject (MyStyle anchors) is who is drawn, wherever it is listed: "glasses + me" is me with
        # glasses, sampled between my photos, not random people moved along my direction.
        subjects = [name for name in named if self.anchors(name) is not None]
        if len(subjects) > 1:
            raise ValueError(f"domains {subjects} are each one subject (sampled between their photos); compose at most one of them with other domains")
        with torch.no_grad():
            w = self.domain_latents(self.sampling_latents(subjects[0] if subjects else domain, n, seed, truncation_psi), strengths)  # (n, D)
        return self._synthesize_batches(w, seed, noise_mode, batch_size)

    @torch.no_grad()
    def _synthesize_batches(self, w: torch.Tensor, seed: int, noise_mode: str, batch_size: int) -> Iterator[torch.Tensor]:
        if noise_mode != "random":
            for chunk in w.split(batch_size):
                yield self.generator.synthesis(chunk, noise_mode=noise_mode).clamp(-1, 1)
            return
        # Fresh noise per image, drawn from the seed (as the latents are) image after image, so a seed
        # gives the same images whatever the batch size, and only one batch's noise is held at a time.
        rng = torch.Generator().manual_seed(int(seed) + 1)
        buffers = self.generator.noise_buffers()  # (1, 1, S, S) each
        for chunk in w.split(batch_size):
            per_image = [[torch.randn(buffer.shape, generator=rng) for buffer in buffers] for _ in range(len(chunk))]
            noise = [torch.cat(layer).to(buffer) for layer, buffer in zip(zip(*per_image), buffers)]  # (B, 1, S, S) each
            yield self.generator.synthesis(chunk, noise=noise).clamp(-1, 1)

    @torch.no_grad()
    def traverse(
        self, domain: str, n: int = 4, seed: int = 0, max_strength: float = 1.0, steps: int = 7, truncation_psi: float = 1.0, batch_size: int = 32
    ) -> torch.Tensor:
        """Images along the domain's direction, strengths -s..s: (n, steps, 3, R, R)."""
        if domain == BASE_DOMAIN:
            raise ValueError(f"the source domain {BASE_DOMAIN!r} has no direction to traverse; traverse one of: {', '.join(self.domain_names) or 'none yet (add a domain first)'}")
        direction = self.get_domain(domain)
        check_strength(max_strength, "max_strength (strips run from -s to +s)")
        amounts = torch.linspace(-max_strength, max_strength, steps) * self.domain_alpha(direction)
        w = self.basis.traverse(self.sampling_latents(domain, n, seed, truncation_psi), direction.direction, amounts)  # (n, S, D)
        images = torch.cat([self.generator.synthesis(chunk) for chunk in w.flatten(0, 1).split(batch_size)]).clamp(-1, 1)  # (n*S, 3, R, R)
        return images.view(n, steps, *images.shape[1:])

    def forward(self, z: torch.Tensor, strengths: Optional[dict[str, float]] = None, truncation_psi: float = 1.0) -> torch.Tensor:
        w = self.generator.mapping(z, truncation_psi)
        return self.generator.synthesis(self.domain_latents(w, strengths or {}))

    # ---- provenance -------------------------------------------------------------------------------

    @property
    def training_log(self) -> list[dict[str, Any]]:
        """Every training run that made this checkpoint, oldest first (copies; see ``record_training``)."""
        return json.loads(json.dumps(self._training_log))

    def record_training(self, run: dict[str, Any]) -> None:
        """Append one training run (a JSON-serialisable dict with at least ``trained``: the domain names).

        Saved as training.json next to the weights, so a published checkpoint says how it was made:
        `add-domain` on a pulled model extends the log of the runs before it.
        """
        _check_training_run(run, where="record_training")
        unknown = sorted(set(run["trained"]) - set(self.domain_names))
        if unknown:
            raise ValueError(f"record_training: the run trained {unknown}, which are not domains of the model ({', '.join(self.domain_names) or 'none'}); add them first")
        try:
            self._training_log.append(json.loads(json.dumps(run)))
        except (TypeError, ValueError) as err:
            raise ValueError(f"record_training needs a JSON-serialisable run record: {err}") from None

    # ---- serialization ----------------------------------------------------------------------------

    def config_dict(self) -> dict[str, Any]:  # keys: CONFIG_KEYS
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "generator": self.generator.config.to_dict(),
            "alpha": self.alpha,
            "num_dormant": self.num_dormant,
            "base_model": self.base_model,
            "description": self.description,
            "has_discriminator": self.discriminator is not None,
        }

    def weights_dict(self) -> dict[str, torch.Tensor]:
        tensors = {f"generator.{k}": v for k, v in self.generator.state_dict().items()}
        tensors["latent_avg"] = self.generator.w_avg
        tensors.update({f"basis.{k}": v for k, v in self.basis.state_dict().items()})
        tensors.update({f"{ANCHORS_PREFIX}{direction}": anchors for direction, anchors in sorted(self._anchors.items())})
        return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}

    def _save_pretrained(self, save_directory: Path) -> None:
        save_directory = Path(save_directory)
        save_file(self.weights_dict(), str(save_directory / WEIGHTS_FILE), metadata={"format": FORMAT_NAME})
        if self.discriminator is not None:
            d_state = {k: v.detach().cpu().contiguous() for k, v in self.discriminator.state_dict().items()}
            save_file(d_state, str(save_directory / DISCRIMINATOR_FILE))
        (save_directory / CONFIG_FILE).write_text(json.dumps(self.config_dict(), indent=2) + "\n")
        (save_directory / DOMAINS_FILE).write_text(json.dumps({"domains": [d.to_dict() for d in self._domains]}, indent=2) + "\n")
        if self._training_log:
            (save_directory / TRAINING_FILE).write_text(json.dumps({"format": TRAINING_FORMAT, "runs": self._training_log}, indent=2) + "\n")
        from .model_card import write_model_card  # local import: pulls in plotting only when saving

        write_model_card(self, save_directory)

    def save_pretrained(
        self,
        save_directory: str | Path,
        *,
        push_to_hub: bool = False,
        repo_id: Optional[str] = None,
        config: Any = None,  # accepted for PyTorchModelHubMixin.push_to_hub; config.json is always config_dict()
        model_card_kwargs: Any = None,  # likewise; the card is generated by expander.model_card
        **push_kwargs: Any,
    ) -> Optional[str]:
        """Write the checkpoint folder atomically: a new folder replaces ``save_directory``, and files there
        that are not the checkpoint's own (a ``.git``, notes, eval reports) are carried over."""
        with atomic_path(save_directory, owned=CHECKPOINT_FILES) as tmp:
            tmp.mkdir()
            super().save_pretrained(tmp)
        if push_to_hub:
            from .hub import push

            # Absolute: a relative folder could be mistaken for a registered model's name.
            return push(os.path.abspath(save_directory), repo_id or Path(save_directory).name, **push_kwargs)
        return None

    def push_to_hub(self, repo_id: str, *, commit_message: str = "Upload expanded generator", private: Optional[bool] = None, token: Optional[str] = None, **unsupported: Any) -> str:
        """Upload this model to a Hub repo as ``expander push`` does (:func:`expander.hub.push`): saved to a
        temporary folder and checked to load first, only the checkpoint's files, and never into an
        existing public repo when ``private``. Returns the commit URL."""
        if unsupported:
            raise TypeError(f"ExpandedGenerator.push_to_hub got unsupported arguments {sorted(unsupported)}; it takes repo_id, commit_message, private and token")
        from .hub import push

        with tempfile.TemporaryDirectory(prefix="expander-push-") as tmp:
            folder = Path(tmp) / "model"
            self.save_pretrained(folder)
            return push(str(folder), repo_id, private=bool(private), token=token, commit_message=commit_message)

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: Optional[str] = None,
        cache_dir: Optional[str] = None,
        force_download: bool = False,
        local_files_only: bool = False,
        token: Any = None,
        map_location: str = "cpu",
        torch_dtype: Optional[torch.dtype] = None,
        **unknown: Any,
    ) -> "ExpandedGenerator":
        from .hub import resolve_model_folder

        if unknown:  # a misspelt option must not load a different model than asked for without a word
            raise TypeError(f"ExpandedGenerator.from_pretrained got unknown arguments {sorted(unknown)}; it takes revision, cache_dir, force_download, local_files_only, token, map_location and torch_dtype (loading is always strict)")
        if torch_dtype is not None and not (isinstance(torch_dtype, torch.dtype) and torch_dtype.is_floating_point):
            raise TypeError(f"torch_dtype must be a floating-point torch.dtype such as torch.float16, got {torch_dtype!r}")

        # As the CLI resolves --model: a registered name first, then a folder (a mistyped one is
        # reported as missing, not sent to the Hub), then a Hub repo id.
        folder, _ = resolve_model_folder(model_id, revision=revision, cache_dir=cache_dir, force_download=force_download, local_files_only=local_files_only, token=token)
        model = cls.load_folder(folder, map_location=map_location)
        return model if torch_dtype is None else model.to(torch_dtype)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> "ExpandedGenerator":
        """Load from a registered name (``expander list``), a local folder or a Hub repo id (``revision=`` pins a commit). Strict."""
        return cls._from_pretrained(model_id=str(pretrained_model_name_or_path), **kwargs)

    @classmethod
    def load_folder(cls, folder: str | Path, map_location: str = "cpu") -> "ExpandedGenerator":
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"model folder not found: {folder}")
        if not (folder / CONFIG_FILE).exists():
            raise FileNotFoundError(
                f"{folder} is not an expander model: it has no {CONFIG_FILE}. Point --model at a model folder, or convert a "
                "StyleGAN2 checkpoint into one with `expander import CHECKPOINT --out FOLDER`"
            )
        config = read_json(folder / CONFIG_FILE, what="model config")
        if not isinstance(config, dict):
            raise CheckpointError(f"{folder / CONFIG_FILE} is invalid: expected a JSON object, got {type(config).__name__}; restore the file or download the model again")
        if config.get("format") != FORMAT_NAME:
            raise CheckpointError(
                f"{folder} is not an expander checkpoint (config.json has format={config.get('format')!r}, expected {FORMAT_NAME!r}). "
                "To start from a plain StyleGAN2 checkpoint use `expander import` / ExpandedGenerator.from_generator."
            )
        version = config.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise CheckpointError(f"{folder / CONFIG_FILE} is invalid: format_version must be a positive integer, got {version!r}; restore the file or download the model again")
        if version > FORMAT_VERSION:
            raise CheckpointError(f"{folder} was written by a newer expander (format {version}); upgrade expander")
        expected = set(CONFIG_KEYS)
        missing, unknown = sorted(expected - set(config)), sorted(set(config) - expected)
        if missing or unknown:
            found = "; ".join(part for part in (f"missing keys {missing}" if missing else "", f"unknown keys {unknown}" if unknown else "") if part)
            raise CheckpointError(f"{folder / CONFIG_FILE} is invalid: {found} (expected exactly {sorted(expected)}); restore the file or download the model again")
        if not isinstance(config["has_discriminator"], bool) or not all(isinstance(config[k], str) for k in ("base_model", "description")):
            raise CheckpointError(f"{folder / CONFIG_FILE} is invalid: has_discriminator must be true or false and base_model, description texts; restore the file or download the model again")
        try:
            num_dormant = config["num_dormant"]
            if not isinstance(num_dormant, int) or isinstance(num_dormant, bool):
                raise ValueError(f"num_dormant must be an integer, got {num_dormant!r}")
            model = cls(config["generator"], alpha=config["alpha"], num_dormant=num_dormant, base_model=config["base_model"], description=config["description"])
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{folder / CONFIG_FILE} is invalid: {err}") from None

        tensors = read_safetensors(folder / WEIGHTS_FILE, what="model weights")
        anchors = {k: tensors.pop(k) for k in [k for k in tensors if k.startswith(ANCHORS_PREFIX)]}
        model._load_weights(tensors, source=folder / WEIGHTS_FILE)
        if config["has_discriminator"]:
            model.discriminator = Discriminator(model.generator.config)
            d_state = read_safetensors(folder / DISCRIMINATOR_FILE, what="discriminator weights")
            _strict_load(model.discriminator, d_state, folder / DISCRIMINATOR_FILE)

        domains = read_domains(folder)
        try:
            model.set_domains(domains)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
            raise CheckpointError(f"invalid domains registry {folder / DOMAINS_FILE}: {err}") from None
        model._load_anchors(anchors, source=folder / WEIGHTS_FILE)
        if (folder / TRAINING_FILE).exists():  # optional: parents and checkpoints of older versions have none
            model._load_training_log(folder / TRAINING_FILE)
        return model.to(map_location).eval()

    def _load_training_log(self, path: Path) -> None:
        try:
            log = read_json(path, what="training log")
            if not isinstance(log, dict) or log.get("format") != TRAINING_FORMAT or not isinstance(log.get("runs"), list):
                raise ValueError(f"expected {{'format': {TRAINING_FORMAT!r}, 'runs': [...]}}")
            for run in log["runs"]:
                _check_training_run(run, where="a run")
        except ValueError as err:
            raise CheckpointError(f"invalid training log {path}: {err}. It only records how the model was trained: restore it, or delete it to load the model without that history") from None
        self._training_log = log["runs"]

    def _load_anchors(self, tensors: dict[str, torch.Tensor], source: Path) -> None:
        by_direction = {d.direction: d.name for d in self._domains}
        for key, anchors in tensors.items():
            suffix = key[len(ANCHORS_PREFIX) :]
            if not suffix.isdigit() or int(suffix) not in by_direction:
                raise CheckpointError(f"{source} has anchors {key!r} for no domain of domains.json (domains use directions {sorted(by_direction)}); the files do not belong together")
            try:
                self.set_anchors(by_direction[int(suffix)], anchors)
            except ValueError as err:
                raise CheckpointError(f"{source}: {err}") from None

    def _load_weights(self, tensors: dict[str, torch.Tensor], source: Path) -> None:
        # basis.dormancy may be of either of two sizes; _check_tensor_values checks it.
        expected = {**self.weights_dict(), "basis.dormancy": None}
        _check_keys(expected, tensors, source)
        _check_tensor_values(tensors, self.generator.style_dim, source)
        basis_state = {k[len("basis.") :]: v for k, v in tensors.items() if k.startswith("basis.")}
        # The dormancy curve may be empty (not measured yet): resize the buffer before a strict load.
        self.basis.dormancy = torch.zeros_like(basis_state["dormancy"])
        try:
            self.generator.load_state_dict({k[len("generator.") :]: v for k, v in tensors.items() if k.startswith("generator.")}, strict=True)
            self.generator.style.w_avg.copy_(tensors["latent_avg"])
            self.basis.load_state_dict(basis_state, strict=True)
        except RuntimeError as err:  # _check_keys compared every shape; kept for what it cannot foresee
            raise CheckpointError(f"{source} does not match its config.json: {err}") from None


def _check_weight_defects(tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Every weight of a checkpoint is finite floating point (``weight_defect``): a load casts integers
    silently and copies NaN as it is, so either would load and draw wrong or NaN images."""
    for key in sorted(tensors):
        defect = weight_defect(tensors[key])
        if defect is not None:
            raise CheckpointError(f"{source}: tensor {key!r} holds {defect}; the checkpoint is corrupt: restore it or download the model again")


def _check_tensor_values(tensors: dict[str, torch.Tensor], style_dim: int, source: Path) -> None:
    """Refuse what the key and shape check (``_check_keys``, run first) lets through: non-float or
    non-finite weights, a dormancy curve of the wrong size (it would silently fall back to
    singular-value order), and a latent basis whose directions are not orthonormal."""
    _check_weight_defects(tensors, source)
    dormancy = tensors["basis.dormancy"]
    if dormancy.ndim != 1 or dormancy.numel() not in (0, style_dim):
        raise CheckpointError(f"{source}: the dormancy curve 'basis.dormancy' has shape {tuple(dormancy.shape)}, expected ({style_dim},) or empty (not measured); the checkpoint is corrupt: restore it or download the model again")
    # A model saved in a low precision (model.to(torch.bfloat16)) rounded its basis too: allow for that.
    coarsest = max(torch.finfo(t.dtype).eps for t in tensors.values() if t.is_floating_point())
    tolerance = max(1e-3, 8 * coarsest)
    directions = tensors["basis.directions"].double()
    error = (directions.T @ directions - torch.eye(style_dim, dtype=torch.float64)).abs().max().item()
    if error > tolerance:
        raise CheckpointError(f"{source}: the latent basis 'basis.directions' is not orthonormal (max |V^T V - I| = {error:.2g}); the checkpoint is corrupt: restore it or download the model again")


def _check_training_run(run: Any, where: str) -> None:
    """A training run record is a mapping that names the domains it trained.

    Loading does not ask that they still be domains of the model: the log is history, and
    ``set_domains`` may have dropped one since.
    """
    if not isinstance(run, dict) or not isinstance(run.get("trained"), list) or not all(isinstance(n, str) for n in run["trained"]):
        raise ValueError(f"{where}: a training run must be a mapping with 'trained': [domain names], got {str(run)[:200]}")
    # The optional fields the model card reads (model_card._training_section), each of its one type.
    kinds = {"date": str, "expander_version": str, "settings": dict, "guidance": dict, "replayed": list, "real_images": str}
    wrong = [f"{key} ({type(run[key]).__name__}, expected {kind.__name__})" for key, kind in kinds.items() if run.get(key) is not None and not isinstance(run[key], kind)]
    if wrong:
        raise ValueError(f"{where}: fields of the wrong type: {', '.join(wrong)}")
    domain_weights = (run.get("settings") or {}).get("domain_weights")
    if domain_weights is not None and not (isinstance(domain_weights, dict) and all(isinstance(w, dict) for w in domain_weights.values())):
        raise ValueError(f"{where}: settings.domain_weights must map domain names to {{loss weight: value}}, got {str(domain_weights)[:200]}")
    negative_prompts = (run.get("settings") or {}).get("negative_prompts")
    if negative_prompts is not None and not (isinstance(negative_prompts, dict) and all(isinstance(p, list) and all(isinstance(t, str) for t in p) for p in negative_prompts.values())):
        raise ValueError(f"{where}: settings.negative_prompts must map domain names to [texts], got {str(negative_prompts)[:200]}")


def _check_keys(expected: dict[str, Optional[torch.Tensor]], tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Key and shape mismatches against ``expected`` (a state dict; None: any shape), checked before
    any load so that another model's weights file is named in one short message."""
    problems = state_mismatches(expected, tensors, limit=3)
    if problems:
        raise CheckpointError(f"{source} does not match its config.json: {problems}. The weights come from another model or config.json was edited: restore the folder (or download the model again)")


def _strict_load(module: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    _check_keys(module.state_dict(), state, source)
    _check_weight_defects(state, source)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:  # shape mismatches
        raise CheckpointError(f"{source} does not match its config.json: {err}") from None
