"""Finding, pulling and pushing expanded models: registry names, local folders and Hub repos."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Optional

from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.utils import LocalEntryNotFoundError

from .checkpoint import CONFIG_FILE, DISCRIMINATOR_FILE, DOMAINS_FILE, WEIGHTS_FILE, ExpandedGenerator
from .registry import PACKAGE_ROOT, ModelEntry, Registry, RegistryError, entry_for_model, is_repo_id, load_registries, register_user_model, user_registry_path

logger = logging.getLogger(__name__)


class ModelNotFoundError(FileNotFoundError):
    pass


def _entry_folder(entry: ModelEntry, local_files_only: bool = False) -> Path:
    source = entry.source
    if "package" in source:
        folder = PACKAGE_ROOT / source["package"]
    elif "path" in source:
        folder = Path(source["path"]).expanduser()
    else:
        folder = _pinned_snapshot(source["repo_id"], source["revision"], local_files_only)
    if not folder.is_dir():
        raise ModelNotFoundError(f"model {entry.name!r} points to {folder}, which does not exist; pull it again or fix the registry")
    return folder


def _pinned_snapshot(repo_id: str, revision: str, local_files_only: bool = False) -> Path:
    """The snapshot a registry entry names. A pinned commit comes from the cache when it is there (a
    commit never changes, so loading a pulled model needs no network, and older huggingface_hub
    releases in offline mode do not look in the cache for a commit first); else it is downloaded."""
    if re.fullmatch(r"[0-9a-f]{40}", revision or ""):
        try:
            cached = Path(snapshot_download(repo_id=repo_id, revision=revision, local_files_only=True))
            if _snapshot_complete(cached):
                return cached
            # else a pull was interrupted: the download below completes the snapshot
        except LocalEntryNotFoundError:
            if local_files_only:
                raise
    return Path(snapshot_download(repo_id=repo_id, revision=revision, local_files_only=local_files_only))


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

    ``download``: further ``snapshot_download`` arguments for a Hub repo id (``cache_dir``, ``token``,
    ``local_files_only``, ``force_download``). Returns (folder, display name): a local folder comes back
    absolute, and the display name is a registry entry's name only when ``model`` was one.
    """
    registry = registry or load_registries()
    if model is None:
        if not registry.default_model:
            raise ModelNotFoundError("no --model given and the registry has no default_model")
        model = registry.default_model
    if model in registry.models:
        return _entry_folder(registry.models[model]), model
    path = Path(model).expanduser()
    if path.is_dir():
        # Absolute, so the folder passed on is never mistaken for a registered name ('./m' -> 'm').
        return Path(os.path.abspath(path)), model
    known = ", ".join(sorted(registry.models)) or "none"
    if _looks_like_local_path(model):
        raise ModelNotFoundError(f"model folder {model} not found (registered models: {known}); check the path, or train or pull the model first")
    if is_repo_id(model):
        try:
            return Path(snapshot_download(repo_id=model, revision=revision, **download)), model
        except Exception as err:  # huggingface_hub raises many network, auth, cache and not-found error types
            raise ModelNotFoundError(
                f"model {model!r} is not a registered model ({known}) or a folder here, and the Hugging Face Hub did not give it "
                f"({type(err).__name__}: {err}); check the repo id and your connection, or `expander pull {model}` while online"
            ) from err
    raise ModelNotFoundError(
        f"model {model!r} not found: it is not a registered model ({known}), not a folder, and not a Hub repo id (org/name). "
        "Run `expander pull ORG/NAME` to fetch one from the Hub."
    )


def _looks_like_local_path(text: str) -> bool:
    """Whether ``text`` names a local folder rather than a Hub repo id: './x', '/x', '~/x', 'a/b/c',
    or 'runs/x' when 'runs' is a folder here, so a mistyped folder is not sent to the Hub."""
    parts = Path(text).parts
    return text.startswith((".", "/", "~", "\\")) or len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).is_dir())


def load_model(model: Optional[str] = None, device: str = "cpu", revision: Optional[str] = None) -> ExpandedGenerator:
    folder, _ = resolve_model_folder(model, revision=revision)
    return ExpandedGenerator.load_folder(folder, map_location=device)


def pull(repo_id: str, revision: Optional[str] = None, name: Optional[str] = None, cache_dir: Optional[str] = None) -> ModelEntry:
    """Download a Hub repo (``snapshot_download``), validate it loads, and record it in the user registry.

    The entry pins the exact commit that was downloaded, so later loads are reproducible.
    """
    folder = Path(snapshot_download(repo_id=repo_id, revision=revision, cache_dir=cache_dir))
    model = ExpandedGenerator.load_folder(folder)  # validates before anything is recorded
    commit = folder.name  # snapshot folders are named by commit hash
    entry = entry_for_model(name or repo_id.split("/")[-1], {"repo_id": repo_id, "revision": commit}, model)
    try:
        register_user_model(entry)
    except OSError as err:  # the download worked: say where the problem is
        raise RegistryError(f"downloaded {repo_id} but could not record it in the user registry {user_registry_path()}: {err}; check $EXPANDER_HOME") from err
    return entry


def push(model: Optional[str], repo_id: str, private: bool = False, token: Optional[str] = None, commit_message: str = "Upload expanded generator") -> str:
    """Upload a model folder (resolved like :func:`resolve_model_folder`) to a Hub repo; returns the commit URL."""
    folder, _ = resolve_model_folder(model)
    ExpandedGenerator.load_folder(folder)  # never publish a checkpoint that does not load
    api = HfApi(token=token)
    api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
    # create_repo leaves an existing repo's visibility as it is: --private must not publish to a public one.
    if private and not getattr(api.repo_info(repo_id=repo_id, repo_type="model"), "private", False):
        raise ValueError(
            f"{repo_id} already exists and is public, so nothing was uploaded: make it private first (its settings page on the Hub, "
            f"or HfApi().update_repo_settings({repo_id!r}, private=True)), or push without --private"
        )
    info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message, repo_type="model")
    return str(getattr(info, "commit_url", info))
