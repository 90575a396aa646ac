"""The zoo index (``registry.json``): model name -> where it lives, its base model and its domains.

Schema (``schema_version`` 1)::

    {
      "schema_version": 1,
      "default_model": "world-portraits",          # used when no --model is given
      "models": {
        "<name>": {
          "description": "one line",
          "source": {"package": "world/weights/portraits"}            # a folder inside the installed package
                  | {"repo_id": "org/name", "revision": "<40-hex commit>"}   # Hub repo, pinned
                  | {"path": "/some/folder"},                          # a local folder
          "base_model": "what the parent generator is",
          "resolution": 64,
          "domains": {"<domain>": {"direction": 120, "alpha": 20.0, "method": "nada"}}
        }
      }
    }

Two files share this schema: the built-in zoo (the repository's top-level ``registry.json``, shipped
inside the package) and the user's registry (``$EXPANDER_HOME/registry.json``, default
``~/.cache/expander``), where ``expander pull`` records models. User entries win on a name clash.
Each update of the user's registry reads, changes and rewrites it under ``registry.json.lock``, so
runs that finish at the same moment each keep their entry.
"""

from __future__ import annotations

import os
import re
import shlex
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from filelock import FileLock, Timeout

from .domains import METHODS, is_valid_alpha
from .utils.io import read_json, write_json

SCHEMA_VERSION = 1
PACKAGE_ROOT = Path(__file__).resolve().parent
BUILTIN_REGISTRY = PACKAGE_ROOT / "registry.json"
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")
# How long a registry update waits for another process's update of the same file.
REGISTRY_LOCK_TIMEOUT_S = 60.0


class RegistryError(ValueError):
    """A registry file that does not follow the schema; the message names the entry and the fix."""


def expander_home() -> Path:
    return Path(os.environ.get("EXPANDER_HOME", Path.home() / ".cache" / "expander"))


def user_registry_path() -> Path:
    return expander_home() / "registry.json"


def is_repo_id(text: str) -> bool:
    return bool(_REPO_ID.fullmatch(text)) and not Path(text).exists()


@dataclass
class ModelEntry:
    name: str
    source: dict[str, str]
    description: str = ""
    base_model: str = ""
    resolution: int = 0
    domains: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "description": self.description,
            "source": dict(self.source),
            "base_model": self.base_model,
            "resolution": self.resolution,
            "domains": {k: dict(v) for k, v in self.domains.items()},
        }

    def location(self) -> str:
        """Human-readable location: package path, repo@revision or folder."""
        if "package" in self.source:
            return f"package:{self.source['package']}"
        if "repo_id" in self.source:
            return f"{self.source['repo_id']}@{self.source['revision'][:10]}"
        return self.source["path"]


def check_model_name(name: Any, where: str = "model name") -> str:
    """``name`` if it can be a registry name; otherwise a RegistryError that says what is allowed."""
    if not isinstance(name, str) or not _MODEL_NAME.fullmatch(name):
        raise RegistryError(f"{where}: invalid model name {name!r}: use 1-96 letters, digits, '_', '-' or '.', starting with a letter or digit")
    return name


def is_protected_model_folder(folder: str | os.PathLike) -> bool:
    """True for a folder inside the package (its built-in models) or the Hugging Face cache: writing
    there would change a built-in model for every later command, or make a cached Hub commit lie."""
    from huggingface_hub import constants

    folder = Path(folder).expanduser().resolve()
    protected = [PACKAGE_ROOT, Path(constants.HF_HUB_CACHE).expanduser().resolve()]
    return any(folder == root or root in folder.parents for root in protected)


def builtin_model_names() -> set[str]:
    """Names of the models shipped inside the package, which no user entry may replace."""
    return {name for name, entry in Registry.load(BUILTIN_REGISTRY).models.items() if "package" in entry.source}


def _validate_entry(name: str, data: Any, where: str) -> ModelEntry:
    prefix = f"{where}: model {name!r}"
    check_model_name(name, where)
    if not isinstance(data, dict):
        raise RegistryError(f"{prefix} must be an object")
    allowed = {"description", "source", "base_model", "resolution", "domains"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise RegistryError(f"{prefix} has unknown keys {unknown}; allowed: {sorted(allowed)}")
    source = data.get("source")
    if not isinstance(source, dict):
        raise RegistryError(f"{prefix} needs a 'source' object")
    kinds = [k for k in ("package", "repo_id", "path") if k in source]
    if len(kinds) != 1:
        raise RegistryError(f"{prefix}: source must have exactly one of 'package', 'repo_id', 'path', got {sorted(source)}")
    if "repo_id" in source:
        if set(source) != {"repo_id", "revision"}:
            raise RegistryError(f"{prefix}: a Hub source needs exactly 'repo_id' and 'revision' (a pinned 40-character commit)")
        if not _COMMIT.fullmatch(str(source["revision"])):
            raise RegistryError(f"{prefix}: revision {source['revision']!r} is not a 40-character commit hash; pin the exact commit")
    elif set(source) != set(kinds):
        raise RegistryError(f"{prefix}: source has unknown keys {sorted(set(source) - set(kinds))}")
    if not isinstance(source[kinds[0]], str) or not source[kinds[0]].strip():
        raise RegistryError(f"{prefix}: source {kinds[0]} must be a non-empty text, got {source[kinds[0]]!r}")
    resolution = data.get("resolution", 0)
    if not isinstance(resolution, int) or (resolution and resolution & (resolution - 1)):
        raise RegistryError(f"{prefix}: resolution must be a power of two, got {resolution!r}")
    domains = data.get("domains", {})
    if not isinstance(domains, dict):
        raise RegistryError(f"{prefix}: domains must be an object name -> {{direction, alpha, method}}")
    directions: dict[int, str] = {}
    for domain_name, spec in domains.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("direction"), int) or isinstance(spec["direction"], bool):
            raise RegistryError(f"{prefix}: domain {domain_name!r} needs an integer 'direction'")
        extra = sorted(set(spec) - {"direction", "alpha", "method"})
        if extra:
            raise RegistryError(f"{prefix}: domain {domain_name!r} has unknown keys {extra}")
        if spec["direction"] < 0:
            raise RegistryError(f"{prefix}: domain {domain_name!r} has a negative direction")
        if spec["direction"] in directions:
            raise RegistryError(f"{prefix}: domains {directions[spec['direction']]!r} and {domain_name!r} share direction {spec['direction']}")
        if "alpha" in spec and not is_valid_alpha(spec["alpha"]):
            raise RegistryError(f"{prefix}: domain {domain_name!r} alpha must be a positive finite number, got {spec['alpha']!r}")
        if "method" in spec and spec["method"] not in METHODS:
            raise RegistryError(f"{prefix}: domain {domain_name!r} method must be one of {list(METHODS)}")
        directions[spec["direction"]] = domain_name
    return ModelEntry(
        name=name,
        source=dict(source),
        description=str(data.get("description", "")),
        base_model=str(data.get("base_model", "")),
        resolution=resolution,
        domains={k: dict(v) for k, v in domains.items()},
    )


@dataclass
class Registry:
    models: dict[str, ModelEntry] = field(default_factory=dict)
    default_model: Optional[str] = None

    @classmethod
    def from_dict(cls, data: Any, where: str = "registry") -> "Registry":
        if not isinstance(data, dict):
            raise RegistryError(f"{where} must be a JSON object")
        unknown = sorted(set(data) - {"schema_version", "default_model", "models"})
        if unknown:
            raise RegistryError(f"{where} has unknown top-level keys {unknown}")
        if data.get("schema_version") != SCHEMA_VERSION:
            raise RegistryError(f"{where}: schema_version must be {SCHEMA_VERSION}, got {data.get('schema_version')!r}")
        models = data.get("models", {})
        if not isinstance(models, dict):
            raise RegistryError(f"{where}: 'models' must be an object")
        registry = cls({name: _validate_entry(name, entry, where) for name, entry in models.items()}, data.get("default_model"))
        if registry.default_model is not None and registry.default_model not in registry.models:
            raise RegistryError(f"{where}: default_model {registry.default_model!r} is not one of its models")
        return registry

    @classmethod
    def load(cls, path: str | Path) -> "Registry":
        path = Path(path)
        return cls.from_dict(read_json(path, what="registry"), where=str(path))

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"schema_version": SCHEMA_VERSION}
        if self.default_model:
            data["default_model"] = self.default_model
        data["models"] = {name: entry.to_dict() for name, entry in sorted(self.models.items())}
        return data

    def save(self, path: str | Path) -> None:
        Registry.from_dict(self.to_dict(), where=str(path))  # never write an invalid file
        write_json(path, self.to_dict())

    def merged(self, other: "Registry") -> "Registry":
        """``other``'s entries on top of ours (user registry over the built-in zoo)."""
        return Registry({**self.models, **other.models}, other.default_model or self.default_model)


def load_registries() -> Registry:
    """Built-in zoo merged with the user's registry (if it exists)."""
    registry = Registry.load(BUILTIN_REGISTRY)
    user = user_registry_path()
    if user.exists():
        try:
            user_registry = Registry.load(user)
        except RegistryError as err:
            raise RegistryError(f"{err}. This is your registry of models (written by expand, add-domain and pull): fix the file by hand, or remove the broken model entry to forget that model (its files stay where they are)") from None
        registry = registry.merged(user_registry)
    return registry


def entry_for_model(name: str, source: dict[str, str], model: Any, description: str = "") -> ModelEntry:
    """Registry entry describing an :class:`~expander.checkpoint.ExpandedGenerator`."""
    domains: dict[str, dict[str, Any]] = {}
    for domain in model.domains:
        domains[domain.name] = {"direction": domain.direction, "alpha": model.domain_alpha(domain), "method": domain.method}
    return ModelEntry(name, source, description or model.description, model.base_model, model.generator.resolution, domains)


def check_user_model_name(name: Any, where: str = "model name") -> str:
    """A valid name that is not a built-in model's: registering it would hide the built-in for every later command."""
    check_model_name(name, where)
    if name in builtin_model_names():
        raise RegistryError(f"{where}: {name!r} is a built-in model and cannot be replaced; register the result under another name")
    return name


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold ``path``'s lock file while it is read, changed and written back.

    Each write is atomic, but two runs that finish at the same moment would otherwise both read the
    old file and the second write would drop the first one's entry.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path) + ".lock")
    try:
        lock.acquire(timeout=REGISTRY_LOCK_TIMEOUT_S)
    except Timeout:
        # Not "delete the lock file": the lock is held by a live process (it is released when its holder exits).
        raise RegistryError(f"registry {path} is being updated by another expander process, which has held its lock ({lock.lock_file}) for more than {REGISTRY_LOCK_TIMEOUT_S:.0f} s; retry when that command has finished") from None
    try:
        yield
    finally:
        lock.release()


def _is_that_models_new_version(registered: ModelEntry, source: dict[str, str]) -> bool:
    """Whether registering ``source`` under the name of the model ``registered`` updates that model
    rather than taking its name: the same Hub repo (at any commit), the same folder, or an entry whose folder is
    gone (nothing left to lose)."""
    old = registered.source
    old_folder = Path(old["path"]).expanduser() if "path" in old else None
    new_folder = Path(source["path"]).expanduser().resolve() if "path" in source else None
    same_repo = "repo_id" in source and old.get("repo_id") == source["repo_id"]
    same_folder = old_folder is not None and new_folder is not None and old_folder.resolve() == new_folder
    folder_gone = old_folder is not None and not old_folder.is_dir()
    return same_repo or same_folder or folder_gone


def check_name_available(name: str, source: dict[str, str], not_done: str) -> None:
    """Refuse to register ``name`` for ``source`` when the user registry has it for another model (see
    ``_is_that_models_new_version`` for what is the same model). Call it before the long work, so a
    taken name costs nothing; ``not_done`` says what was skipped ("downloaded", "trained").
    :func:`register_user_model` checks again when it registers, as the name may be taken meanwhile."""
    path = user_registry_path()
    existing = Registry.load(path).models.get(name) if path.exists() else None
    if existing is None or _is_that_models_new_version(existing, source):
        return
    raise RegistryError(
        f"{name!r} is already the registered name of another model ({existing.location()}), so nothing was {not_done}: choose another "
        f"name with --name, or remove the {name!r} entry from {path} first (its files stay where they are)"
    )


def _name_taken_meanwhile(entry: ModelEntry, registered: ModelEntry, path: Path) -> RegistryError:
    """The error for a model finished after another one took its name: the model exists, so say where
    and how to reach it, and how to register it under another name."""
    source = entry.source
    # Typically taken by another run or pull after this one's check_name_available, before its long work.
    taken = f"{entry.name!r} is already the registered name of another model ({registered.location()})"
    if "repo_id" in source:
        return RegistryError(
            f"downloaded {source['repo_id']}@{source['revision'][:10]} into the Hugging Face cache but did not register it: {taken}. "
            f"Register it under another name with `expander pull {source['repo_id']} --revision {source['revision']} --name OTHER_NAME` "
            "(its files are cached, so nothing is downloaded again)"
        )
    if "path" in source:
        # No command registers a finished folder: the folder itself works everywhere a name does.
        return RegistryError(
            f"saved the model in {source['path']} but did not register it: {taken}. Use it by its folder (--model {shlex.quote(source['path'])}), "
            f"or train it again with --name OTHER_NAME (its training state is gone; the folder already works without a name)"
        )
    return RegistryError(f"did not register {entry.location()}: {taken}; register it under another name")


def register_user_model(entry: ModelEntry, new_version: bool = False) -> Path:
    """Add a model to the user registry, or update its entry, atomically.

    Built-in names are refused, and so is a name another model has (the check of
    :func:`check_name_available`, repeated under the lock: two runs with the same name, or a pull
    racing a training run, each passed that check before their long work, and the later one must not
    silently replace the other's entry). ``new_version``: the caller made this entry from the model
    registered under its name (add-domain in place, which writes it to ``$EXPANDER_HOME/models/NAME``),
    so it replaces that entry whatever it pointed to.
    """
    check_user_model_name(entry.name)
    path = user_registry_path()
    with _locked(path):
        registry = Registry.load(path) if path.exists() else Registry()
        registered = registry.models.get(entry.name)
        if registered is not None and not new_version and not _is_that_models_new_version(registered, entry.source):
            raise _name_taken_meanwhile(entry, registered, path)
        registry.models[entry.name] = entry
        registry.save(path)
    return path


def refresh_user_entries(folder: str | Path, model: Any) -> list[str]:
    """Update the domains of every user entry whose folder is ``folder`` (after a new version was written there).

    Returns the names updated; the registry is rewritten atomically, and only when something changed.
    """
    path = user_registry_path()
    if not path.exists():
        return []
    folder = Path(folder).resolve()

    def entries_of_folder(registry: Registry) -> list[str]:
        return [name for name, entry in registry.models.items() if "path" in entry.source and Path(entry.source["path"]).expanduser().resolve() == folder]

    if not entries_of_folder(Registry.load(path)):
        return []  # nothing to write: no lock either, so a read-only $EXPANDER_HOME is fine
    with _locked(path):
        registry = Registry.load(path)  # again, under the lock: another run may have changed it since
        stale = entries_of_folder(registry)
        for name in stale:
            old = registry.models[name]
            registry.models[name] = entry_for_model(name, dict(old.source), model, old.description)
        if stale:
            registry.save(path)
    return stale
