"""Atomic file and folder writes, and training state (modules + optimizers + RNG) in safetensors.

Every write goes to a temporary sibling first and is moved into place with ``os.replace``, so a
crash or a validation error never leaves a half-written checkpoint, registry or state behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Collection, Iterator, Optional

import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)


def check_replaceable(path: str | os.PathLike, why: str = "a checkpoint replaces its folder whole") -> Path:
    """``path`` made absolute, or a ValueError when writing it would replace the current folder (or
    one that contains it): ``--out .`` would swap the folder the process runs in from under it. Call it
    before long work (training), so the mistake costs a second, not the run."""
    path = Path(os.path.abspath(path))
    cwd, real = Path.cwd(), Path(os.path.realpath(path))
    if real == cwd or real in cwd.parents:
        raise ValueError(f"cannot write {path}: it is the current folder or contains it, and {why}; write to a new folder (e.g. --out {path.name}-v2) or run from outside it")
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, owned: Optional[Collection[str]] = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it onto ``path`` (file or folder).

    A folder replaces the old one by two renames (old aside, new in place); if the second fails, the
    old folder is put back. ``owned``: the entry names the new folder is responsible for (e.g. a
    checkpoint's files); every other entry of the old folder (a ``.git``, a user's notes) moves into
    the new one instead of being deleted. None: the new folder replaces the old one whole.
    """
    # Absolute ('.' or 'a/..' have no usable name), and through symlinks: a `runs/latest` link stays a
    # link to the folder it names, which gets the new files, instead of being replaced by a copy.
    path = Path(os.path.realpath(check_replaceable(path)))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp / path.name
    try:
        yield target
        if not target.exists():
            raise RuntimeError(f"nothing was written for {path}")
        _open_like_plain_files(target)
        if path.is_dir() and target.is_dir():
            _swap_folders(path, target, tmp / (path.name + ".old"), owned)
        else:
            os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _open_like_plain_files(target: Path) -> None:
    """Give the files written under ``target`` the mode a plain ``open()`` gives (0644 under umask 022).

    safetensors writes through a private temporary file (mode 0600): without this, the weights of a
    model folder shared with a team or served from a shared disk could be read by their owner only.
    """
    mode = 0o666 & ~_current_umask()
    for file in [target] if target.is_file() else target.rglob("*"):
        if file.is_file() and not file.is_symlink() and not file.stat().st_mode & 0o111:
            os.chmod(file, mode)


def _current_umask() -> int:
    """The process's umask, read without changing it where the system says it (Linux); elsewhere by
    setting and restoring it, which briefly affects files other threads create."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _swap_folders(path: Path, new: Path, backup: Path, owned: Optional[Collection[str]]) -> None:
    """Put folder ``new`` at ``path``, carrying over the old folder's entries not in ``owned``."""
    carried = []
    try:
        if owned is not None:
            for entry in sorted(path.iterdir()):
                if entry.name not in owned and not (new / entry.name).exists():
                    os.replace(entry, new / entry.name)  # same file system: a rename, whatever its size
                    carried.append(entry.name)
        os.replace(path, backup)
        try:
            os.replace(new, path)
        except BaseException:
            os.replace(backup, path)
            raise
    except BaseException:
        for name in carried:  # back into the old folder, which is at `path` again
            if (new / name).exists():
                os.replace(new / name, path / name)
        raise


def write_json(path: str | os.PathLike, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise ValueError(f"{what} {path} is a folder, not a JSON file; remove it or restore the file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{what} {path} is not valid JSON ({err}); restore it or re-create it") from None


def read_safetensors(path: str | os.PathLike, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file`` with a message that says which file is broken and what to do."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own SafetensorError / OSError variants
        raise ValueError(
            f"{what} {path} is not a readable safetensors file ({err}). It may be truncated or corrupt: "
            "download or save it again."
        ) from None


# --------------------------------------------------------------------------------------------------
# Training state: flattened into one safetensors file + one JSON file (no pickle anywhere).
# --------------------------------------------------------------------------------------------------


def save_network_folder(folder: str | os.PathLike, module: torch.nn.Module, config: dict[str, Any]) -> Path:
    """A small frozen network as ``config.json`` + ``model.safetensors``, written atomically."""
    folder = Path(folder)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": str(config.get("format", ""))})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def copy_network_folder(source: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Copy the inference files of :func:`save_network_folder` (never training state) atomically."""
    source, dest = Path(source), Path(dest)
    with atomic_path(dest) as tmp:
        tmp.mkdir()
        for name in ("config.json", "model.safetensors"):
            (tmp / name).write_bytes((source / name).read_bytes())
    return dest


def read_network_config(folder: str | os.PathLike, format_name: str, what: str) -> dict[str, Any]:
    """``folder/config.json`` of :func:`save_network_folder`, refused when it is another format."""
    path = Path(folder) / "config.json"
    config = read_json(path, what=f"{what} config")
    if config.get("format") != format_name:
        raise ValueError(f"{path} is not a {what} config (format {config.get('format')!r})")
    return config


def weight_defect(tensor: torch.Tensor) -> Optional[str]:
    """Why ``tensor`` cannot be a network weight, or None: ``"a int8 tensor, not floating point"``,
    ``"NaN values"`` or ``"infinite values"``.

    ``load_state_dict`` casts integers to float without a word and copies NaN as it is, so every
    loader (checkpoints, imports) asks this before it builds anything from a file.
    """
    if not tensor.is_floating_point():
        return f"a {str(tensor.dtype).removeprefix('torch.')} tensor, not floating point"
    if not bool(torch.isfinite(tensor).all()):
        return "NaN values" if bool(torch.isnan(tensor).any()) else "infinite values"
    return None


def short_list(items: Collection[str], limit: int) -> str:
    """``a, b, ... (N more)``: a few names of a list that can run to hundreds (another model's keys)."""
    items = list(items)
    if len(items) <= limit:
        return ", ".join(items)
    return ", ".join(items[:limit]) + f", ... ({len(items) - limit} more)"


def mismatch_report(missing: Collection[str], unexpected: Collection[str], mismatched: Collection[str], limit: int = 5) -> str:
    """One line naming what keeps a state dict from loading strictly; "" when nothing does."""
    parts = []
    for kind, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
        if items:
            parts.append(f"{kind}: {short_list(items, limit)}")
    return "; ".join(parts)


def state_mismatches(expected: dict[str, Optional[torch.Tensor]], state: dict[str, torch.Tensor], limit: int = 5) -> str:
    """:func:`mismatch_report` of ``state`` against ``expected`` (a module's state dict; None: any shape)."""
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    mismatched = [
        f"{k} (file {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
        for k in sorted(set(expected) & set(state))
        if expected[k] is not None and state[k].shape != expected[k].shape
    ]
    return mismatch_report(missing, unexpected, mismatched, limit)


def load_network_state(module: torch.nn.Module, folder: str | os.PathLike, what: str) -> torch.nn.Module:
    """Load ``folder/model.safetensors`` into ``module`` strictly, naming any key or shape mismatch."""
    path = Path(folder) / "model.safetensors"
    state = read_safetensors(path, what=what)
    problems = state_mismatches(module.state_dict(), state)
    if problems:
        raise ValueError(f"{path} does not match its config: {problems}")
    module.load_state_dict(state, strict=True)
    return module


def _flatten_optimizer(prefix: str, optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, param_state in state["state"].items():
        for key, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}/state/{param_id}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(param_id), {})[key] = value
    meta[prefix] = {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(prefix: str, optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith(prefix + "/state/"):
            param_id, key = name[len(prefix + "/state/") :].split("/", 1)
            state.setdefault(int(param_id), {})[key] = value
    for param_id, values in meta[prefix]["scalars"].items():
        state.setdefault(int(param_id), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta[prefix]["param_groups"]})


def save_training_state(
    folder: str | os.PathLike,
    modules: dict[str, torch.nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    generators: dict[str, torch.Generator],
    info: dict[str, Any],
) -> None:
    """Save everything needed to resume bit-for-bit: weights, optimizer moments, RNG states, step."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"info": info, "numerics": numeric_environment(modules)}
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            tensors[f"module/{name}/{key}"] = value.detach().cpu().contiguous()
    for name, optimizer in optimizers.items():
        _flatten_optimizer(f"optim/{name}", optimizer, tensors, meta)
    for name, rng in generators.items():
        tensors[f"rng/{name}"] = rng.get_state()
    tensors["rng/torch_global"] = torch.get_rng_state()
    # owned: anything else a run keeps in its state folder (the model it started from) stays
    with atomic_path(folder, owned=("state.safetensors", "state.json")) as tmp:
        tmp.mkdir()
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta, indent=2))


# How a world model's training starts over when its saved state does not match (``expander world build``).
WORLD_RESTART_HINT = "start over with `expander world build --what PART --no-resume`"


def setting_differences(saved: dict[str, Any], now: dict[str, Any], may_change: tuple[str, ...] = ()) -> list[str]:
    """``"name: X in the state, Y now"`` for each setting of ``now`` that ``saved`` holds with another value.

    Settings in ``may_change`` (e.g. ``steps``: a run may be continued for longer) and settings the saved
    run did not have yet are not differences. Compared after a JSON round trip, as saved: tuples equal lists.
    """
    now = json.loads(json.dumps(now, default=str))
    return [f"{name}: {saved.get(name, '(unset)')!r} in the state, {value!r} now" for name, value in now.items() if name not in may_change and saved.get(name, value) != value]


def load_training_state(
    folder: str | os.PathLike,
    modules: dict[str, torch.nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    generators: dict[str, torch.Generator],
    config: dict[str, Any] | None = None,
    may_change: tuple[str, ...] = ("steps",),
    restart_hint: str = "start over without resuming",
) -> dict[str, Any]:
    """Restore what :func:`save_training_state` wrote (strictly); returns its ``info``.

    With ``config`` (this run's settings), a state saved with other settings (but ``may_change``) is
    refused with a ValueError naming each difference, before anything is loaded: the weights would fit,
    and the run would silently continue another training.
    """
    folder = Path(folder)
    if config is not None:
        saved = read_json(folder / "state.json", what="training state").get("info", {})
        differences = setting_differences(saved.get("config", {}), config, may_change)
        if differences:
            raise ValueError(f"cannot resume from the training state in {folder}: it was saved with other settings ({'; '.join(differences)}); resume with the settings that started it, or {restart_hint}")
    tensors = read_safetensors(folder / "state.safetensors", what="training state")
    meta = read_json(folder / "state.json", what="training state")
    for name, module in modules.items():
        prefix = f"module/{name}/"
        module.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=True)
    for name, optimizer in optimizers.items():
        _unflatten_optimizer(f"optim/{name}", optimizer, tensors, meta)
    for name, rng in generators.items():
        rng.set_state(tensors[f"rng/{name}"])
    torch.set_rng_state(tensors["rng/torch_global"])
    _warn_if_numerics_differ(folder, meta.get("numerics"), numeric_environment(modules))
    return meta["info"]


def numeric_environment(modules: dict[str, torch.nn.Module]) -> dict[str, Any]:
    """What decides a run's floating-point results beyond its settings and state: the torch build, the
    device (on CPU its vector instructions and the intra-op thread count: parallel sums add in another
    order, so two steps at 1 and 2 threads already differ in the fifth decimal of the world model's
    weights; on a GPU its model). Not everything: GPU kernels need not be deterministic at all."""
    parameter = next((p for module in modules.values() for p in module.parameters()), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    if device.type == "cpu":  # the vector instructions torch dispatches to (AVX2, AVX512, ...) change the sums too
        return {"torch": torch.__version__, "device": "cpu", "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        return {"torch": torch.__version__, "device": "cuda", "gpu": torch.cuda.get_device_name(device)}
    return {"torch": torch.__version__, "device": device.type}


def _warn_if_numerics_differ(folder: Path, saved: Optional[dict[str, Any]], now: dict[str, Any]) -> None:
    """A resume in another numeric environment is allowed (a state moves between machines) but is not
    bit-for-bit the uninterrupted run; say so, once per run (rank 0 of a multi-process launch), and how
    to match it when only the thread count differs. States saved before this record: silent."""
    if not saved or saved == now or (torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0):
        return
    differing = [key for key in sorted(set(saved) | set(now)) if saved.get(key) != now.get(key)]
    changes = [f"{key}: {saved.get(key, '(not recorded)')} in the state, {now.get(key, '(not recorded)')} now" for key in differing]
    hint = (  # threads alone differ: both are CPU states, so both record them
        f"; to continue it bit for bit, resume at {saved['cpu_threads']} threads (OMP_NUM_THREADS={saved['cpu_threads']}; "
        f"EXPANDER_THREADS or --threads for `python -m expander.world.*` builds, which set their own)"
        if differing == ["cpu_threads"] else ""
    )
    logger.warning(
        "resuming the training state in %s in another numeric environment (%s): the run continues, but not bit for bit as the uninterrupted run would have%s",
        folder, "; ".join(changes), hint,
    )
