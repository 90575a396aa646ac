"""From a recipe or an `add-domain` call to a saved, registered expanded checkpoint.

Everything that can be checked is checked before training starts, and the result is written
atomically at the end, so a bad input or a crash never leaves a half-written checkpoint or registry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import torch

from .checkpoint import CHECKPOINT_FILES, CONFIG_FILE, WEIGHTS_FILE, ExpandedGenerator, check_keeps_domains
from .domains import Domain
from .hub import resolve_model_folder
from .losses.mystyle import invert_images
from .registry import check_user_model_name, entry_for_model, is_protected_model_folder, load_registries, refresh_user_entries, register_user_model
from .train import ExpansionConfig, check_resumable, check_run_domains, check_teacher_prompts, domain_signature, expand, gan_discriminator
from .utils.io import atomic_path, check_replaceable

logger = logging.getLogger(__name__)

# Inside a kept training state: the model the run started from (see keep_starting_model).
STARTING_MODEL = "starting-model"


def load_domain_images(source: str, resolution: int) -> torch.Tensor:
    """Images of a mystyle domain: a folder, or ``world:subject:SEED`` (one world identity, 10 poses)."""
    from .world.renderer import subject_photos, world_subject_seed

    seed = world_subject_seed(source)
    if seed is not None:
        images = subject_photos(seed)
        if images.shape[-1] != resolution:
            images = torch.nn.functional.interpolate(images, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
        return images
    from .utils.images import load_image_folder

    return load_image_folder(source, resolution)


def run_expansion(
    model: Optional[str],
    domains: list[Domain],
    out: str | Path,
    config: Optional[ExpansionConfig] = None,
    guidance_spec: Optional[dict[str, Any]] = None,
    name: Optional[str] = None,
    resume: bool = False,
    force: bool = False,
    keep_state: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    device: str = "auto",
    real_images: Optional[str | Path] = None,
    description: str = "",
) -> ExpandedGenerator:
    """Load the parent, register ``domains`` on free dormant directions, train, save to ``out``, register.

    ``description``: the expanded model's one line (model card, config, registry; a recipe's
    ``description``); empty keeps the parent's.

    Under ``accelerate launch`` with several processes, every process trains (data-parallel, see
    ``expander.distributed``) and only the main one writes the checkpoint and the registry.

    The resumable training state lives next to ``out`` (``.NAME.state``) while the run goes and is deleted
    once the checkpoint is written, unless ``keep_state``: then a finished run can be continued for more
    steps with ``resume=True`` and a larger ``config.steps``, exactly as if it had been started that long.

    ``real_images``: a folder of real photos of the parent's own domain (e.g. faces for an FFHQ model)
    for the GAN loss on the base subspace, which needs the model's discriminator; without it, world
    models use world renders and other models train without the GAN loss.

    ``overwrite``: replace a model in ``out`` that has domains the result would not have (refused
    otherwise, before training: it is another model); the same model written again needs no overwrite.

    ``device``: where a single-process run trains ("auto": the first CUDA GPU when there is one, else
    the CPU); under ``accelerate launch`` each rank takes the device accelerate gives it. Latents are
    drawn on the CPU either way, so a run sees the same latents on any device (the weights it reaches
    differ only by the devices' arithmetic), and a state saved on one device resumes on another.
    """
    from .distributed import is_distributed_launch, make_accelerator, place_guidance
    from .guidance.build import build_guidance

    config = config or ExpansionConfig()
    out = check_replaceable(out)  # '--out .' fails now, not after training
    if is_protected_model_folder(out):
        raise ValueError(f"cannot write {out}: it is inside a built-in or downloaded model (the package's models or the Hugging Face cache), which every later command reads; write the result to a folder of your own (--out)")
    if out.exists() and not out.is_dir():
        raise ValueError(f"cannot write {out}: it is a file, and the result is a model folder; choose another --out")
    if name is not None:
        check_user_model_name(name, "the name to register the result under")  # before hours of training, not after
    accelerator = None
    if is_distributed_launch():
        accelerator = make_accelerator()
    is_main = accelerator is None or accelerator.is_main_process
    # this rank's device (accelerate's), or the one asked for: checked before anything is loaded
    run_device = accelerator.device if accelerator is not None else training_device(device)
    state_dir = training_state_dir(out)
    if resume and not (state_dir / "state.json").is_file():  # else a finished run would train again from step 0, over its result
        raise ValueError(f"--resume: there is no training state in {state_dir} to continue (a run saves one every checkpoint_every steps and deletes it once its checkpoint is written, unless --keep-state); run without --resume to start from step 0")
    starting_copy = state_dir / STARTING_MODEL
    starting_folder = None  # where this run's parent was read from, when not from its kept copy
    if resume and (starting_copy / CONFIG_FILE).is_file():
        parent = ExpandedGenerator.load_folder(starting_copy)
        parent_digest = _file_digest(starting_copy / WEIGHTS_FILE)
    else:
        starting_folder, _ = resolve_model_folder(model)
        parent = ExpandedGenerator.load_folder(starting_folder)
        parent_digest = _file_digest(starting_folder / WEIGHTS_FILE)
    replayed = parent.domain_names  # the domains the model had before this run
    # Directions named explicitly are reserved first, so an 'auto' domain listed earlier cannot take them.
    requested = {d.direction for d in domains if d.direction >= 0}
    for domain in domains:
        parent.add_domain(domain, force=force, reserved=requested)  # validates names and directions before any work
    check_run_domains(config, domains, parent.generator.resolution)  # per-domain settings, before any guidance model loads
    check_keeps_domains(out, parent.domain_names, overwrite)
    # Read every subject's photos before loading any guidance model: a bad folder fails in a second.
    subject_images = {d.name: load_domain_images(d.images, parent.generator.resolution) for d in domains if d.method == "mystyle"}
    real_images = Path(real_images).expanduser().resolve() if real_images else None  # the same run from any folder
    real_sampler = _real_sampler(parent, real_images, config)
    if real_images and real_sampler is None:
        real_images = None  # not used (lambda_gan is 0): neither recorded nor part of the run's signature
    # The parent's weights are part of the run: resumed onto another parent with the same domains, the
    # state's synthesis weights would meet that parent's basis, latent average and replay targets.
    # The parent as named too: a resume that finds the kept copy of its starting model reads that copy, not `model`.
    run_info = {"parent": parent_spec(model), "parent_weights_sha256": parent_digest, "guidance": guidance_spec, **({"real_images": str(real_images)} if real_images else {})}
    if resume:  # a mismatch is refused here, before minutes of guidance loading (the state exists: checked above)
        gan = gan_discriminator(parent, real_sampler, config) is not None
        signature = domain_signature([parent.get_domain(d.name) for d in domains], [parent.get_domain(n) for n in replayed])
        check_resumable(state_dir, config, signature, {**run_info, "gan": gan}, 1 if accelerator is None else accelerator.num_processes)
    parent.to(run_device)
    guidance = place_guidance(build_guidance(parent, sorted({d.method for d in domains}), guidance_spec, config, device=str(run_device)), run_device)
    check_teacher_prompts([parent.get_domain(d.name) for d in domains], parent.domains, guidance, config)  # before the inversions and any kept copy
    subject_images = {k: v.to(run_device) for k, v in subject_images.items()}
    for domain_name, images in subject_images.items():
        w = invert_images(parent.generator, images, guidance.perceptual, steps=config.mystyle_inversion_steps, progress=progress and is_main)
        if accelerator is not None:
            from accelerate.utils import broadcast

            w = broadcast(w.contiguous())  # rank 0's inversion, so every rank reconstructs the same targets
        guidance.mystyle_targets[domain_name] = (images, w)
    # After every check: a refused run neither keeps a copy nor deletes the one an earlier --keep-state run kept.
    if is_main and not resume:
        shutil.rmtree(starting_copy, ignore_errors=True)  # an earlier run's: a later --resume must not start from it
    if keep_state and is_main and starting_folder is not None:
        keep_starting_model(starting_folder, starting_copy)
    expand(parent, domains, guidance, config, state_dir=state_dir, resume=resume, real_sampler=real_sampler, progress=progress, accelerator=accelerator, run_info=run_info)
    for domain_name, (_, w) in guidance.mystyle_targets.items():
        parent.set_anchors(domain_name, w)  # the subject is sampled between its inversions, not at random latents
    if description:
        parent.description = description
    parent.record_training(training_run_record(config, [d.name for d in domains], replayed, guidance_spec, 1 if accelerator is None else accelerator.num_processes, real_images))
    try:
        if is_main:
            parent.save_pretrained(out)
            refresh_user_entries(out, parent)  # other names of this folder list its new domains too
            if not keep_state:
                shutil.rmtree(state_dir, ignore_errors=True)
            if name:  # last: a name taken meanwhile is refused, and the saved model is then finished all the same
                # Expanded from the model registered under this very name (add-domain in place): its new version.
                register_user_model(entry_for_model(name, {"path": str(out.resolve())}, parent), new_version=model == name)
    finally:
        if accelerator is not None:
            accelerator.wait_for_everyone()  # the other ranks return once the checkpoint is in place, or the main one failed
    return parent


def training_device(device: str = "auto") -> torch.device:
    """``device`` as a torch.device, with "auto" the first CUDA GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda") or (resolved.type == "cpu" and resolved.index not in (None, 0)):
        raise ValueError(f"unknown device {device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but this torch sees no CUDA GPU (torch {torch.__version__}); use --device cpu or 'auto'")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r} asked for, but this machine has {torch.cuda.device_count()} CUDA GPU(s): use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    return resolved


def parent_spec(model: Optional[str]) -> str:
    """How a run names its parent, as a resume compares it: a registered name or a Hub id as given, the
    default model by its name, a folder as its absolute path (the same run resumes from any directory)."""
    registry = load_registries()
    if model is None:
        return registry.default_model or ""
    path = Path(model).expanduser()
    if model not in registry.models and path.is_dir():  # a registered name wins over a folder, as when loading
        return str(path.resolve())
    return model


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def keep_starting_model(folder: Path, copy: Path) -> None:
    """Copy the checkpoint files of the model a run starts from into its training state.

    A run kept for ``--resume --steps N`` may have written its result over the model it started from
    (add-domain in place): continuing it must start from, and replay against, the model as it was.
    """
    with atomic_path(copy) as tmp:
        tmp.mkdir()
        for name in CHECKPOINT_FILES:
            if (folder / name).is_file():
                shutil.copy2(folder / name, tmp / name)


def training_state_dir(out: str | Path) -> Path:
    """Where a run writing ``out`` keeps its resumable state: beside it, hidden, never inside the checkpoint."""
    out = Path(out)
    return out.parent / f".{out.name}.state"


def training_run_record(
    config: ExpansionConfig, trained: list[str], replayed: list[str], guidance_spec: Optional[dict[str, Any]], processes: int = 1, real_images: Optional[str | Path] = None
) -> dict[str, Any]:
    """What one run did, for the checkpoint's training.json and model card: enough to reproduce it."""
    from . import __version__

    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "expander_version": __version__,
        "trained": list(trained),
        "replayed": list(replayed),
        "guidance": json.loads(json.dumps(guidance_spec or {}, default=str)),  # paths as text
        "processes": processes,
        **({"real_images": str(real_images)} if real_images else {}),  # the GAN loss's photos
        "settings": asdict(config),  # every setting, defaults included: defaults may change between versions
    }


def _real_sampler(model: ExpandedGenerator, real_images: Optional[str | Path], config: ExpansionConfig):
    """Real images for the GAN loss: the user's folder, else world renders for world models, else none."""
    if real_images is None:
        return _world_real_sampler(model)
    from .utils.images import ImageFolderSampler

    if model.discriminator is None:
        raise ValueError(
            f"real images ({real_images}) are for the GAN loss, which needs the model's discriminator, and this model has none; "
            "import the model with its discriminator (expander import keeps one when the checkpoint has it), or leave the real images out"
        )
    sampler = ImageFolderSampler(real_images, model.generator.resolution)  # checked even when unused: a typo fails now
    if config.lambda_gan == 0:
        logger.warning("real images given, but lambda_gan is 0: the GAN loss is off and the photos are not used")
        return None
    return sampler


def _world_real_sampler(model: ExpandedGenerator):
    """Real source-domain images for the GAN loss: renders, for world models; none for others."""
    from .guidance.perceptual import is_world_model

    if not is_world_model(model) or model.discriminator is None:
        return None
    from .world.renderer import sample_portraits

    return lambda n, rng: sample_portraits(n, rng, with_captions=False).images
