"""Finding, pulling and pushing expanded models: registry names, local folders and Hub repos."""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path
from typing import Any, Optional

from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.utils import LocalEntryNotFoundError

from .checkpoint import CHECKPOINT_FILES, CONFIG_FILE, DISCRIMINATOR_FILE, DOMAINS_FILE, WEIGHTS_FILE, ExpandedGenerator
from .registry import PACKAGE_ROOT, ModelEntry, Registry, RegistryError, check_name_available, check_user_model_name, entry_for_model, is_repo_id, load_registries, register_user_model, user_registry_path

# What push uploads and pull downloads: a model folder's other files (notes, eval reports) are the
# user's and stay local, and a repo's other files are not the model's and are not fetched.
HUB_FILES = list(CHECKPOINT_FILES)


class ModelNotFoundError(FileNotFoundError):
    pass


def _entry_folder(entry: ModelEntry, **download: Any) -> Path:
    """The folder of a registry entry; ``download``: ``snapshot_download`` arguments for a Hub entry."""
    source = entry.source
    if "package" in source:
        folder = PACKAGE_ROOT / source["package"]
    elif "path" in source:
        folder = Path(source["path"]).expanduser()
    else:
        try:
            folder = _pinned_snapshot(source["repo_id"], source["revision"], **download)
        except Exception as err:  # huggingface_hub raises many network, auth, cache and not-found error types
            # Typically the Hugging Face cache was cleared and the Hub cannot be reached (offline): the
            # raw error speaks of snapshot folders and HF_HUB_OFFLINE, not of the model or how to get it back.
            raise ModelNotFoundError(
                f"model {entry.name!r} is registered as {source['repo_id']} at commit {source['revision']}, but that snapshot is not in the "
                f"Hugging Face cache and could not be downloaded ({type(err).__name__}: {err}); fetch it again while online with "
                f"`expander pull {source['repo_id']} --revision {source['revision']} --name {entry.name}`"
            ) from err
    if not folder.is_dir():
        raise ModelNotFoundError(f"model {entry.name!r} points to {folder}, which does not exist; pull it again or fix the registry")
    return folder


def _pinned_snapshot(repo_id: str, revision: str, local_files_only: bool = False, force_download: bool = False, **download: Any) -> Path:
    """The snapshot a registry entry names. A pinned commit comes from the cache when it is there (a
    commit never changes, so loading a pulled model needs no network, and older huggingface_hub
    releases in offline mode do not look in the cache for a commit first); else it is downloaded.
    ``download``: further ``snapshot_download`` arguments (``cache_dir``, ``token``)."""
    if re.fullmatch(r"[0-9a-f]{40}", revision or "") and not force_download:
        try:
            cached = Path(snapshot_download(repo_id=repo_id, revision=revision, allow_patterns=HUB_FILES, local_files_only=True, **download))
            if _snapshot_complete(cached):
                return cached
            # else a pull was interrupted: the download below completes the snapshot
        except LocalEntryNotFoundError:
            if local_files_only:
                raise
    return Path(snapshot_download(repo_id=repo_id, revision=revision, allow_patterns=HUB_FILES, local_files_only=local_files_only, force_download=force_download, **download))


def _snapshot_complete(snapshot: Path) -> bool:
    """Whether a cached snapshot holds a whole checkpoint: every file loading needs (the discriminator
    when the config names one), and no download of this repo stopped half-way (huggingface_hub keeps
    ``blobs/*.incomplete`` until a file is whole), which also catches a missing optional file such as
    training.json whose download had started."""
    if not all((snapshot / name).is_file() for name in (CONFIG_FILE, WEIGHTS_FILE, DOMAINS_FILE)):
        return False
    try:
        config = json.loads((snapshot / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False  # a truncated config: download it again
    if isinstance(config, dict) and config.get("has_discriminator") and not (snapshot / DISCRIMINATOR_FILE).is_file():
        return False
    blobs = snapshot.parent.parent / "blobs"  # <cache>/models--owner--name/{blobs,snapshots/<commit>}
    return not any(blobs.glob("*.incomplete"))


def resolve_model_folder(model: Optional[str] = None, registry: Optional[Registry] = None, revision: Optional[str] = None, **download: Any) -> tuple[Path, str]:
    """Map ``model`` (None = default, a registry name, a folder, or a Hub repo id) to a local folder.

    ``download``: further ``snapshot_download`` arguments (``cache_dir``, ``token``, ``local_files_only``,
    ``force_download``) for a Hub repo id and for a registered model pulled from the Hub. ``revision``
    is for a Hub repo id only: a registered model is pinned to the commit it was pulled at.
    Returns (folder, display name): a local folder comes back absolute; the display name is ``model``
    as given, or the default model's name when ``model`` is None.
    """
    registry = registry or load_registries()
    if model is None:
        if not registry.default_model:
            raise ModelNotFoundError("no --model given and the registry has no default_model")
        model = registry.default_model
    if model in registry.models:
        entry = registry.models[model]
        if revision is not None:
            raise ValueError(f"{model!r} is a registered model ({entry.location()}), so revision={revision!r} cannot apply to it; pass the Hub repo id with the revision instead, or leave revision out")
        return _entry_folder(entry, **download), model
    path = Path(model).expanduser()
    if path.is_dir():
        if revision is not None:  # else the folder would load as it is, and the caller believe it got that revision
            raise ValueError(f"{model!r} is a local folder ({os.path.abspath(path)}), so revision={revision!r} cannot apply to it: a revision pins a commit of a Hub repo, and a folder has none; leave revision out, or pass the Hub repo id with the revision instead")
        # Absolute, so the folder passed on is never mistaken for a registered name ('./m' -> 'm').
        return Path(os.path.abspath(path)), model
    if path.is_file():
        raise ModelNotFoundError(_file_instead_of_model_folder(model, path))
    known = ", ".join(sorted(registry.models)) or "none"
    if _looks_like_local_path(model):
        raise ModelNotFoundError(f"model folder {model} not found (registered models: {known}); check the path, or train or pull the model first")
    if is_repo_id(model):
        try:
            return Path(snapshot_download(repo_id=model, revision=revision, allow_patterns=HUB_FILES, **download)), model
        except Exception as err:  # huggingface_hub raises many network, auth, cache and not-found error types
            raise ModelNotFoundError(
                f"model {model!r} is not a registered model ({known}) or a folder here, and the Hugging Face Hub did not give it "
                f"({type(err).__name__}: {err}); check the repo id and your connection, or `expander pull {model}` while online"
            ) from err
    raise ModelNotFoundError(
        f"model {model!r} not found: it is not a registered model ({known}), not a folder, and not a Hub repo id (org/name). "
        "Run `expander pull ORG/NAME` to fetch one from the Hub."
    )


# Files `expander import` converts into a model folder: rosinality .pt/.pth, NVIDIA .pkl (a .safetensors
# file holds one flat dict, never a checkpoint's g_ema; import says how to wrap one).
IMPORTABLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle")


def _file_instead_of_model_folder(model: str, path: Path) -> str:
    """What to pass instead of a file given as the model: its model folder, or the folder that
    `expander import` makes of a checkpoint file; a model is always a folder of several files."""
    folder = os.path.dirname(model.rstrip("/\\")) or "."
    if (path.parent / CONFIG_FILE).is_file() and (path.parent / WEIGHTS_FILE).is_file():
        return f"model {model!r} is a file of the model folder {folder}: pass the folder itself (--model {shlex.quote(folder)})"
    if path.suffix.lower() in IMPORTABLE_SUFFIXES:
        pickle = " --allow-pickle" if path.suffix.lower() in (".pkl", ".pickle") else ""
        return f"model {model!r} is a checkpoint file, not an expander model folder: convert it first with `expander import {shlex.quote(model)} --out DIR{pickle}`, then pass --model DIR"
    return f"model {model!r} is a file, not a model folder: pass a model folder, a registered name (`expander list`) or a Hub repo id (org/name)"


def _looks_like_local_path(text: str) -> bool:
    """Whether ``text`` names a local folder rather than a Hub repo id: './x', '/x', '~/x', 'a/b/c',
    or 'runs/x' when 'runs' is a folder here, so a mistyped folder is not sent to the Hub."""
    parts = Path(text).parts
    return text.startswith((".", "/", "~", "\\")) or len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).is_dir())


def load_model(model: Optional[str] = None, device: str = "cpu", revision: Optional[str] = None) -> ExpandedGenerator:
    folder, _ = resolve_model_folder(model, revision=revision)
    return ExpandedGenerator.load_folder(folder, map_location=device)


def pull(repo_id: str, revision: Optional[str] = None, name: Optional[str] = None, token: Optional[str] = None) -> ModelEntry:
    """Download a Hub repo's checkpoint files (``snapshot_download`` into the default cache, where
    later loads look), validate that it loads, and record it in the user registry under ``name``
    (default: the repo's name).

    The entry pins the exact commit that was downloaded, so later loads are reproducible. Pulling a
    repo again updates its entry; a name that another model is registered under is refused before
    anything is downloaded, and again when the entry is written (another run may take it meanwhile).
    """
    name = check_user_model_name(name or repo_id.split("/")[-1], "pull --name")
    check_name_available(name, {"repo_id": repo_id}, "downloaded")
    folder = Path(snapshot_download(repo_id=repo_id, revision=revision, allow_patterns=HUB_FILES, token=token))
    model = ExpandedGenerator.load_folder(folder)  # validates before anything is recorded
    commit = folder.name  # snapshot folders are named by commit hash
    entry = entry_for_model(name, {"repo_id": repo_id, "revision": commit}, model)
    try:
        register_user_model(entry)
    except OSError as err:  # the download worked: say where the problem is
        raise RegistryError(f"downloaded {repo_id} but could not record it in the user registry {user_registry_path()}: {err}; check $EXPANDER_HOME") from err
    return entry


def push(model: Optional[str], repo_id: str, private: bool = False, token: Optional[str] = None, commit_message: str = "Upload expanded generator") -> str:
    """Upload a model (resolved like :func:`resolve_model_folder`) to a Hub repo; returns the commit URL.

    Only the checkpoint's files are uploaded, and the repo's earlier checkpoint files that this model
    does not have (a discriminator, a training log) are deleted in the same commit, so the repo holds
    this model and nothing of an earlier one. A new repo is private only with ``private``; else it
    gets the owner's default visibility.
    """
    folder, _ = resolve_model_folder(model)
    ExpandedGenerator.load_folder(folder)  # never publish a checkpoint that does not load
    api = HfApi(token=token)
    api.create_repo(repo_id=repo_id, private=private or None, exist_ok=True, repo_type="model")  # None: the owner's default
    # create_repo leaves an existing repo's visibility as it is: --private must not publish to a public one.
    if private and not getattr(api.repo_info(repo_id=repo_id, repo_type="model"), "private", False):
        raise ValueError(
            f"{repo_id} already exists and is public, so nothing was uploaded: make it private first (its settings page on the Hub, "
            f"or HfApi().update_repo_settings({repo_id!r}, private=True)), or push without --private"
        )
    info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message, repo_type="model", allow_patterns=HUB_FILES, delete_patterns=HUB_FILES)
    return str(getattr(info, "commit_url", info))
