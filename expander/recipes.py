"""Expansion recipes: a YAML file that says which model to expand, with which domains and settings.

```yaml
model: world-portraits            # registered name, folder, or Hub repo id of the parent
out: runs/world-nada-10           # where the expanded checkpoint is written (optional when `expander expand --out` is given)
name: world-nada-10               # optional: register the result under this name
guidance:                         # optional; defaults pick the world's models for world parents
  clip: [openai/clip-vit-base-patch32, openai/clip-vit-base-patch16]   # or world CLIPs: [world, world-b] (the default for world parents), world
  clip_loss: cosine               # NADA direction loss: cosine (default) | projection (default for world CLIPs)
  clip_views: 0                   # paired augmented views per image for NADA (default 0; 4 for world CLIPs)
  clip_max_projection: null       # projection loss only: stop pushing a sample once it projects this far (default: no cap)
  perceptual: auto                # auto | world | lpips-vgg | lpips-alex
  diffusion: world                # or a diffusers Stable Diffusion id, for sds domains
training:                         # any expander.train.ExpansionConfig field
  steps: 300
  seed: 0
domains:
  - {name: glasses, method: nada, prompt: "a portrait of a person with glasses"}
  - {name: me, method: mystyle, images: photos/me, direction: 100, alpha: 5.0}
  - {name: blue_skin, prompt: "a portrait of a person with blue skin", weights: {lambda_nada_consistency: 0.3}}
```

A domain's ``weights`` override the ``training`` loss weights for that domain's own adaptation losses
(``expander.train.DOMAIN_LOSS_WEIGHTS``); they become ``training.domain_weights``. A NADA or SDS
domain's ``negative_prompts`` (a text or a list) name what it must not draw, as a diffusion negative
prompt does (NADA: ``expander.losses.loss_nada_negative``, weighted by ``lambda_nada_negative``; SDS:
negation in the guided noise); they become ``training.negative_prompts``:

```yaml
  - {name: eyepatch, prompt: "a portrait of a person wearing an eyepatch", negative_prompts: ["a portrait of a person wearing sunglasses"]}
```

A variant of a recipe names it with ``extends`` and writes only what changes:

```yaml
extends: world-nada-10.yaml       # relative to this file; that recipe may extend another
out: runs/variant
training: {seed: 3, lambda_composed_edits: 2.0}    # these settings replace the parent's, the rest stay
domains:
  - {name: blue_skin, weights: {lambda_nada_consistency: 0.6}}   # merged into the parent's blue_skin
  - {name: ghost, prompt: "a portrait of a ghost"}                 # a new name: added after the parent's
remove_domains: [pop_art]         # parent's domains left out of this run
```

Top-level keys replace the parent's, but ``out`` and ``name`` are a recipe's own (a variant names its
folder, or gets it from ``expander expand --out``); ``training`` and ``guidance`` are merged setting
by setting (an empty block changes nothing); a domain entry whose name the parent has is merged key
by key into the parent's entry (its ``weights`` weight by weight, and a weight written ``null`` falls
back to the run's), a name the parent lacks is a new domain, and a name both in ``remove_domains``
and in ``domains`` replaces the parent's domain whole (to change its method). The parent's domain
``images`` and ``real_images`` stay relative to the parent's file; every other path (``out``, a folder
``model``) is relative to where the command runs, as in any recipe. The merged recipe is checked as one.
"""

from __future__ import annotations

import collections.abc
import difflib
import os

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .domains import METHODS, Domain, check_domain_name, is_valid_alpha
from .guidance.build import check_guidance_spec
from .registry import RegistryError, check_user_model_name
from .train import ExpansionConfig, check_domain_weight_methods, check_exclusive_targets, check_negative_prompts

_TOP_KEYS = {"model", "out", "name", "guidance", "training", "domains", "description", "real_images"}
_VARIANT_KEYS = {"extends", "remove_domains"}  # read, and gone, before the merged recipe is checked
_OWN_KEYS = {"out", "name"}  # a recipe's own, not inherited by the recipes that extend it
_DOMAIN_KEYS = {"name", "method", "prompt", "source_prompt", "negative_prompts", "images", "direction", "alpha", "weights"}


class RecipeError(ValueError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key written twice in one mapping: plain YAML keeps the last copy
    silently, so a pasted second `training:` block or a domain's second `prompt:` would change the run
    without a word. Checked where merges (`<<: *defaults`) are flattened, before them: a key a merge
    brings in may be overridden, as YAML means."""

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        checked = self.__dict__.setdefault("_checked_mappings", set())
        if id(node) not in checked:  # a merged mapping is flattened again for each mapping that merges it
            checked.add(id(node))
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, collections.abc.Hashable):
                    continue  # SafeLoader's own error names it
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice in one mapping; keep one", key_node.start_mark)
                seen.add(key)
        super().flatten_mapping(node)


@dataclass
class Recipe:
    model: Optional[str]
    out: Optional[str]  # None: the caller names the folder (`expander expand --out`)
    domains: list[Domain]
    training: ExpansionConfig
    name: Optional[str] = None
    description: str = ""
    guidance: dict[str, Any] = field(default_factory=dict)
    real_images: Optional[str] = None  # photos of the parent's domain for the GAN loss (a folder)

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        return _load(Path(path))[0]

    @classmethod
    def from_dict(cls, data: Any, where: str = "recipe", base_dir: Optional[Path] = None) -> "Recipe":
        if not isinstance(data, dict):
            raise RecipeError(f"{where} must be a mapping with keys {sorted(_TOP_KEYS)}")
        variant_keys = sorted(set(data) & _VARIANT_KEYS)
        if variant_keys:
            raise RecipeError(f"{where}: {variant_keys} can only be read from a recipe file (Recipe.load), where `extends` names the parent recipe relative to it")
        unknown = sorted(set(data) - _TOP_KEYS, key=str)  # key=str: YAML reads `on:` or `no:` as a bool
        if unknown:
            raise RecipeError(f"{where} has unknown keys {unknown}; allowed: {sorted(_TOP_KEYS)}")
        for key, kind, usage in (("model", str, "a registered name, a folder or a Hub repo id (quote a name YAML reads as a number: model: \"2024\")"), ("training", dict, "a mapping of ExpansionConfig settings"), ("description", str, "one line of text")):
            if data.get(key) is not None and not isinstance(data[key], kind):
                raise RecipeError(f"{where}: '{key}' must be {usage}, got {data[key]!r}")
        if isinstance(data.get("model"), str) and not data["model"].strip():  # '' would resolve to the current folder
            raise RecipeError(f"{where}: 'model' is empty; name the model to expand (a registered name, a folder or a Hub repo id), or leave the key out for the default model")
        out = data.get("out")
        if out is not None and (not isinstance(out, str) or not out.strip()):
            raise RecipeError(f"{where}: 'out' must be a folder path, got {out!r}")
        if out is not None:
            out = str(Path(out).expanduser())  # relative stays relative to where the command runs
        guidance = {} if data.get("guidance") is None else data["guidance"]  # "" or [] are refused, not taken for {}
        try:
            check_guidance_spec(guidance)
        except ValueError as err:
            raise RecipeError(f"{where}: {err}") from None
        entries = data.get("domains")
        if not isinstance(entries, list) or not entries:
            raise RecipeError(f"{where} needs a non-empty 'domains' list")
        domains, weights, negatives = [], {}, {}
        for i, entry in enumerate(entries):
            domains.append(_domain(entry, f"{where}: domains[{i}]", base_dir))
            if domains[-1].name in weights:
                raise RecipeError(f"{where}: duplicate domain name {domains[-1].name!r}")
            weights[domains[-1].name] = entry.get("weights") or {}
            if entry.get("negative_prompts") not in (None, []):  # null or [] in a variant: none (drops the parent's)
                negatives[domains[-1].name] = _negative_prompts(entry["negative_prompts"], f"{where}: domains[{i}]")
        training_data = dict(data.get("training") or {})
        for key, what, example in (("domain_weights", "loss weights", "weights: {lambda_nada_consistency: 0.3}"), ("negative_prompts", "negative prompts", 'negative_prompts: ["a portrait of a person wearing sunglasses"]')):
            if key in training_data:
                raise RecipeError(f"{where}: set a domain's {what} in its entry ({example}), not in training.{key}")
        if any(weights.values()):
            training_data["domain_weights"] = {name: own for name, own in weights.items() if own}
        if negatives:
            training_data["negative_prompts"] = negatives
        try:
            training = ExpansionConfig.from_dict(training_data)
            check_domain_weight_methods(training, domains)
            check_exclusive_targets(training, domains)
            check_negative_prompts(training, domains)
        except (TypeError, ValueError) as err:
            raise RecipeError(f"{where}: {err}") from None
        real_images = data.get("real_images")
        if real_images is not None:
            if not isinstance(real_images, str) or not real_images.strip():
                raise RecipeError(f"{where}: 'real_images' must be a folder of photos, got {real_images!r}")
            real_images = _recipe_folder(real_images, base_dir)  # like a domain's images: relative to the recipe
        description = data.get("description") or ""
        if not isinstance(description, str) or "\n" in description.strip():
            raise RecipeError(f"{where}: 'description' must be one line of text (the model card's and the registry's), got {description!r}")
        name = data.get("name")
        if name is not None:
            try:
                check_user_model_name(name, f"{where}: 'name'")
            except RegistryError as err:
                raise RecipeError(str(err)) from None
        return cls(data.get("model"), out, domains, training, name, description.strip(), guidance, real_images=real_images)


def resolved_recipe(path: str | Path) -> dict:
    """The recipe file at ``path`` as the one mapping it stands for: the recipes it ``extends`` merged
    in, their folders made absolute. Checked (a RecipeError says what is wrong), so it loads as
    ``Recipe.load(path)`` does; for showing a variant as it will run."""
    return _load(Path(path))[1]


def _load(path: Path) -> tuple[Recipe, dict]:
    """The checked recipe at ``path`` and the merged mapping it was read from (files read once)."""
    if not path.is_file():
        raise FileNotFoundError(f"recipe not found: {path}")
    data, parents = _read_with_parents(path, ())
    where = str(path) + (f" (with {' and '.join(str(parent) for parent in parents)}, which it extends)" if parents else "")
    return Recipe.from_dict(data, where=where, base_dir=path.parent), data


def _recipe_folder(folder: str, base_dir: Optional[Path]) -> str:
    """A folder a recipe names (``~`` expanded), relative to the recipe's own folder ``base_dir`` when
    it is relative and the recipe has one."""
    folder = Path(folder).expanduser()
    return str(folder if base_dir is None or folder.is_absolute() else (base_dir / folder).resolve())


def _read_yaml(path: Path, extended_by: Optional[Path] = None) -> Any:
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        by = f" (extended by {extended_by})" if extended_by is not None else ""
        raise RecipeError(f"recipe {path}{by} is not valid YAML: {err}") from None


def _read_with_parents(path: Path, children: tuple[Path, ...]) -> tuple[Any, list[Path]]:
    """The recipe at ``path`` with the recipes it extends merged under it, and those recipes' paths
    (nearest first). ``children``: the files already being read that extend this one, for loops."""
    data = _read_yaml(path, children[-1] if children else None)
    if not isinstance(data, dict) or "extends" not in data:
        if isinstance(data, dict) and "remove_domains" in data:
            raise RecipeError(f"{path}: remove_domains leaves out domains of the recipe this one extends, but it has no `extends: PARENT.yaml`; add one, or delete the domains from its list")
        return data, []
    reference = data["extends"]
    if not isinstance(reference, str) or not reference.strip():
        raise RecipeError(f"{path}: 'extends' must be the path of the recipe this one changes (relative to {path.parent}), got {reference!r}")
    parent_path = Path(reference).expanduser()
    if not parent_path.is_absolute():
        parent_path = Path(os.path.normpath(path.parent / parent_path))
    if not parent_path.is_file():
        raise RecipeError(f"{path}: extends {reference!r}, but {parent_path} is not a recipe file; give its path relative to {path.parent}")
    chain = (*children, path)
    if parent_path.resolve() in {step.resolve() for step in chain}:
        raise RecipeError(f"{path}: recipes extend each other in a loop: {' -> '.join(str(step) for step in (*chain, parent_path))}; one of them must be a whole recipe")
    parent, grandparents = _read_with_parents(parent_path, chain)
    if not isinstance(parent, dict):
        raise RecipeError(f"{parent_path} (extended by {path}) must be a mapping with keys {sorted(_TOP_KEYS)}")
    return _merged(_with_absolute_folders(parent, parent_path.parent), data, str(path)), [parent_path, *grandparents]


def _with_absolute_folders(data: dict, base_dir: Path) -> dict:
    """``data`` with its relative folders (a domain's ``images``, ``real_images``) made absolute from
    ``base_dir``, so a recipe that extends it from another folder still finds them."""
    def absolute(folder: Any) -> Any:
        if not isinstance(folder, str) or folder.startswith("world:") or not folder.strip():
            return folder  # the merged recipe's checks name what is wrong with it
        return _recipe_folder(folder, base_dir)

    data = dict(data)
    if "real_images" in data:
        data["real_images"] = absolute(data["real_images"])
    if isinstance(data.get("domains"), list):
        data["domains"] = [{**entry, "images": absolute(entry["images"])} if isinstance(entry, dict) and "images" in entry else entry for entry in data["domains"]]
    return data


def _merged(parent: dict, child: dict, where: str) -> dict:
    """``child`` (a recipe that extends ``parent``) written over ``parent``; see the module docstring."""
    # `out` and `name` say where this run's result goes and what it is registered as: inherited, a
    # variant would train into its parent's folder or take over its parent's name.
    merged = {key: value for key, value in parent.items() if key not in _OWN_KEYS}
    removed = child.get("remove_domains")
    if removed is not None:
        names = [entry.get("name") for entry in parent.get("domains") or [] if isinstance(entry, dict)]
        if not isinstance(removed, list) or not removed or not all(isinstance(name, str) for name in removed):
            raise RecipeError(f"{where}: remove_domains must list domain names of the recipe it extends, e.g. [pop_art], got {removed!r}")
        unknown = [name for name in removed if name not in names]
        if unknown:
            raise RecipeError(f"{where}: remove_domains names {unknown}, which the recipe it extends does not have; its domains: {names}")
        if isinstance(parent.get("domains"), list):
            merged["domains"] = [entry for entry in parent["domains"] if not (isinstance(entry, dict) and entry.get("name") in removed)]
    for key, value in child.items():
        if key in _VARIANT_KEYS:
            continue
        if key in ("training", "guidance") and isinstance(merged.get(key), dict) and (value is None or isinstance(value, dict)):
            merged[key] = {**merged[key], **(value or {})}  # an empty block (`training:` and comments) changes nothing
        elif key == "domains" and isinstance(value, list) and isinstance(merged.get("domains"), list):
            merged[key] = _merged_domains(merged["domains"], value, where, set(removed or ()))
        else:
            merged[key] = value
    return merged


def _merged_domains(parents: list, children: list, where: str, removed: set) -> list:
    """The parent's domain entries (less the ``removed`` ones), each with the child's entry of the
    same name written over it, then the child's new domains (a removed name written again is new)."""
    merged = list(parents)
    position = {entry["name"]: i for i, entry in enumerate(parents) if isinstance(entry, dict) and isinstance(entry.get("name"), str)}
    seen = set()
    for entry in children:
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or name not in position:
            if isinstance(name, str) and not any(entry.get(key) for key in ("prompt", "images", "method")):
                # Only changes, for a name the parent does not have: a typo, not a new domain.
                if name in removed:
                    raise RecipeError(f"{where}: domain {name!r} is in remove_domains, so its entry here is a whole new domain and needs its prompt (or images and method); to change only some of its keys, take it out of remove_domains")
                close = difflib.get_close_matches(name, list(position), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise RecipeError(f"{where}: domain {name!r} is not in the recipe it extends (its domains: {list(position)}){hint} A new domain needs a prompt or images")
            merged.append(entry)  # a new domain (or a malformed entry, which the checks refuse)
            continue
        if name in seen:
            raise RecipeError(f"{where}: domain {name!r} is changed twice; merge the two entries")
        seen.add(name)
        base = merged[position[name]]
        combined = {**base, **entry}
        if "weights" in entry and (entry["weights"] is None or isinstance(entry["weights"], dict)):
            inherited = base["weights"] if isinstance(base.get("weights"), dict) else {}
            weights = {**inherited, **(entry["weights"] or {})}  # `weights:` left empty changes nothing
            combined["weights"] = {key: weight for key, weight in weights.items() if weight is not None}  # null: back to the run's weight
        merged[position[name]] = combined
    return merged


def _negative_prompts(value: Any, where: str) -> list[str]:
    """A domain entry's ``negative_prompts`` (one text or a list of texts) as a list, or a RecipeError."""
    prompts = [value] if isinstance(value, str) else value
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise RecipeError(f"{where}: negative_prompts must be a text or a list of texts the domain must not draw, e.g. [\"a portrait of a person wearing sunglasses\"], got {value!r}")
    return prompts


def _domain(entry: Any, where: str, base_dir: Optional[Path]) -> Domain:
    if not isinstance(entry, dict):
        raise RecipeError(f"{where} must be a mapping")
    unknown = sorted(set(entry) - _DOMAIN_KEYS, key=str)
    if unknown:
        raise RecipeError(f"{where} has unknown keys {unknown}; allowed: {sorted(_DOMAIN_KEYS)}")
    if not entry.get("name"):
        raise RecipeError(f"{where} needs a 'name'")
    if not isinstance(entry["name"], str):
        raise RecipeError(f"{where}: 'name' must be a text (quote a name YAML reads as a number or a date), got {entry['name']!r}")
    try:
        check_domain_name(entry["name"])
    except ValueError as err:
        raise RecipeError(f"{where}: {err}") from None
    method = entry.get("method") or ("mystyle" if entry.get("images") else "nada")
    if method not in METHODS or method == "manual":
        raise RecipeError(f"{where}: method must be nada, sds or mystyle, got {method!r}")
    if method in ("nada", "sds") and not str(entry.get("prompt") or "").strip():
        raise RecipeError(f"{where}: a {method} domain needs a non-empty 'prompt'")
    # Keys another method would read do nothing here: refused, as another method's loss weights are.
    inert = [key for key, methods in (("images", ("mystyle",)), ("source_prompt", ("nada",)), ("negative_prompts", ("nada", "sds")), ("prompt", ("nada", "sds"))) if entry.get(key) not in (None, []) and method not in methods]
    if inert:
        raise RecipeError(f"{where}: {', '.join(inert)} would do nothing for a {method} domain (images are a mystyle domain's, source_prompt a nada domain's, negative_prompts a nada or sds domain's, a prompt a nada or sds domain's); remove it, or set the method")
    images = entry.get("images")
    if method == "mystyle":
        if not images:
            raise RecipeError(f"{where}: a mystyle domain needs 'images' (a folder of photos of the subject)")
        if not isinstance(images, str):
            raise RecipeError(f"{where}: 'images' must be a folder of photos of the subject, got {images!r}")
        if not images.startswith("world:"):
            images = _recipe_folder(images, base_dir)
    if entry.get("weights") is not None and not isinstance(entry["weights"], dict):
        raise RecipeError(f"{where}: weights must map loss weights to numbers, e.g. {{lambda_nada_consistency: 0.3}}, got {entry['weights']!r}")
    for key in ("prompt", "source_prompt"):
        if entry.get(key) is not None and not isinstance(entry[key], str):
            raise RecipeError(f"{where}: {key} must be a text, got {entry[key]!r}")
    if entry.get("source_prompt") is not None and not entry["source_prompt"].strip():
        raise RecipeError(f"{where}: source_prompt is blank; leave it out to measure the edit from training.source_prompt, or give the text the edit starts from")
    alpha = entry.get("alpha")
    if alpha is not None and not is_valid_alpha(alpha):
        raise RecipeError(f"{where}: alpha must be a positive number (the distance of the domain's subspace along its direction) or left out for the model's, got {alpha!r}")
    direction = entry.get("direction", "auto")
    if direction in (None, "auto"):
        direction = -1
    if not isinstance(direction, int) or isinstance(direction, bool):
        raise RecipeError(f"{where}: direction must be an integer or 'auto', got {direction!r}")
    return Domain(
        name=entry["name"],
        direction=direction,
        method=method,
        prompt=entry.get("prompt"),
        source_prompt=entry.get("source_prompt"),
        images=images,
        alpha=None if alpha is None else float(alpha),
    )
