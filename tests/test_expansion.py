"""Recipes, `expander add-domain` / `expand` end to end, and the real-model guidance code paths.

Everything runs on tiny random models saved to tmp_path: the real-model paths (transformers CLIP,
diffusers Stable Diffusion with its VAE, lpips) are the same classes a user loads from the Hub.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image

from expander.checkpoint import ExpandedGenerator
from expander.cli import main
from expander.domains import Domain
from expander.guidance.clip import ClipGuidance
from expander.guidance.diffusion import StableDiffusionGuidance
from expander.guidance.perceptual import lpips_distance
from expander.losses.mystyle import invert_images
from expander.losses.sds import ScoreDistillation, SdsConfig
from expander.recipes import Recipe, RecipeError
from expander.registry import load_registries
from expander.train import ExpansionConfig, Expander, Guidance

from .conftest import TINY_SD_RESOLUTION

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


# ---- recipes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_parse(path):
    recipe = Recipe.load(path)
    assert recipe.domains and recipe.out
    assert len({d.name for d in recipe.domains}) == len(recipe.domains)


def test_world_recipe_prompts_are_in_the_world_clip_vocabulary():
    from expander.guidance.clip import out_of_vocabulary
    from expander.world.clip import load_world_clip

    _, tokenizer = load_world_clip()
    for path in RECIPES.glob("world-*.yaml"):
        recipe = Recipe.load(path)
        for domain in recipe.domains:
            for prompt in [domain.prompt, *recipe.training.negative_prompts.get(domain.name, ())]:
                if prompt:
                    assert out_of_vocabulary(tokenizer, prompt) == [], (path.name, prompt)


GOOD = {"model": "m", "out": "o", "domains": [{"name": "zombie", "prompt": "a zombie"}]}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"colour": "red"}, "unknown keys"),
        ({"out": ""}, "'out' must be a folder path"),
        ({"out": ["a", "b"]}, "'out' must be a folder path"),
        ({"training": {"stepz": 3}}, "unknown training settings"),
        ({"training": {"composition_both_ways": "no"}}, "composition_both_ways must be true or false"),
        ({"training": {"lr": "0.002"}}, "lr must be a finite number"),
        ({"training": {"steps": 0}}, "steps must be at least 1"),
        ({"training": {"checkpoint_every": 0}}, "checkpoint_every must be at least 1"),
        ({"training": {"lambda_replay_l2": -10}}, "lambda_replay_l2 must be >= 0"),
        ({"training": {"betas": [0.9]}}, "betas must be two numbers"),
        ({"training": {"sds_t_min": 0.6, "sds_t_max": 0.5}}, "sds_t_min < sds_t_max"),
        ({"training": {"nada_contrast": 2}}, "nada_contrast must be in"),
        ({"training": {"nada_dual_ridge": 0.1}}, "set nada_contrast: 0 to use the dual basis"),
        ({"training": {"nada_contrast": 0, "nada_dual_ridge": 0}}, "nada_dual_ridge must be > 0"),
        ({"training": {"nada_consistency_temperature": 0}}, "nada_consistency_temperature must be > 0"),
        ({"training": {"lambda_nada_consistency": 1, "batch_size": 2}}, "lambda_nada_consistency needs batch_size >= 3"),
        ({"guidance": {"clipp": "world"}}, "unknown guidance keys"),
        ({"guidance": {"clip_views": True}}, "clip_views must be a whole number >= 0"),
        ({"guidance": {"clip_views": 2.7}}, "clip_views must be a whole number >= 0"),
        ({"guidance": {"clip_max_projection": True}}, "clip_max_projection must be a number > 0, or null"),
        ({"guidance": {"clip_loss": "l2"}}, "clip_loss must be one of"),
        ({"guidance": {"perceptual": "vgg"}}, "perceptual must be one of"),
        ({"guidance": {"clip": []}}, "guidance clip must be a CLIP name"),
        ({"guidance": ["world"]}, "guidance must be a mapping"),
        ({"domains": []}, "non-empty 'domains'"),
        ({"real_images": ["a", "b"]}, "'real_images' must be a folder of photos"),
        ({"description": ["two", "lines"]}, "'description' must be one line of text"),
        ({"description": "one\ntwo"}, "'description' must be one line of text"),
        ({"domains": [{"name": "z", "prompt": "a zombie"}, {"name": "z", "prompt": "a ghost"}]}, "duplicate domain name 'z'"),
        ({"domains": [{"name": "z", "prompt": "   "}]}, "non-empty 'prompt'"),
        ({"domains": [{"name": "z", "method": "mystyle"}]}, "needs 'images'"),
        ({"domains": [{"name": "z", "method": "mystyle", "images": 3}]}, "'images' must be a folder of photos"),
        ({"training": {"lowpass_size": 0}}, "lowpass_size must be at least 1"),
        ({"domains": [{"name": "z", "prompt": "x", "method": "paint"}]}, "method must be"),
        ({"domains": [{"name": "z", "prompt": "x", "direction": "last"}]}, "direction must be an integer"),
        ({"domains": [{"name": "z", "prompt": "x", "colour": 1}]}, "unknown keys"),
        ({"domains": [{"name": "z", "prompt": "x", "alpha": [5]}]}, "alpha must be a positive number"),
        ({"domains": [{"name": "z", "prompt": "x", "alpha": "5"}]}, "alpha must be a positive number"),
        ({"domains": [{"name": "z", "prompt": "x", "alpha": float("inf")}]}, "alpha must be a positive number"),
        ({"domains": [{"name": "z", "prompt": "x", "alpha": 0}]}, "alpha must be a positive number"),
        ({"domains": [{"name": "z", "prompt": ["a zombie", "a ghost"]}]}, "prompt must be a text"),
        ({"training": [1, 2]}, "'training' must be a mapping"),
        ({"domains": [{"name": "z", "prompt": "x", "weights": 0.3}]}, "weights must map loss weights to numbers"),
        ({"domains": [{"name": "z", "prompt": "x", "weights": {"lambda_replay_l2": 3}}]}, r"cannot be set per domain.*set them in `training`"),
        ({"domains": [{"name": "z", "prompt": "x", "weights": {"lambda_nada": -1}}]}, "lambda_nada of domain 'z' must be >= 0"),
        ({"domains": [{"name": "z", "prompt": "x", "weights": {"lambda_nada": "1"}}]}, "lambda_nada of domain 'z' must be a finite number"),
        ({"domains": [{"name": "z", "prompt": "x", "weights": {"lambda_nada_consistency": 1}}], "training": {"batch_size": 2}}, "lambda_nada_consistency needs batch_size >= 3"),
        ({"training": {"domain_weights": {"zombie": {"lambda_nada": 2}}}}, "set a domain's loss weights in its entry"),
        ({"name": "my model"}, "invalid model name 'my model'"),
        ({"name": 2024}, "invalid model name 2024"),
        ({"name": "world-portraits"}, "'world-portraits' is a built-in model"),
        ({"name": "my-model\n"}, "invalid model name"),  # `$` would let a final newline through
        ({"model": 2024}, "'model' must be a registered name, a folder or a Hub repo id"),
        ({"training": []}, "'training' must be a mapping"),  # falsy values are not taken for {}
        ({"guidance": ""}, "guidance must be a mapping"),
        ({"description": 0}, "'description' must be one line of text"),
        ({"domains": [{"name": "z", "prompt": "x", "weights": 0}]}, "weights must map loss weights to numbers"),
        ({"domains": [{"name": 5, "prompt": "x"}]}, "'name' must be a text"),
        ({"domains": [{"name": "z\n", "prompt": "x"}]}, "invalid domain name"),
        ({"domains": [{"name": "z", "prompt": "x", "source_prompt": "  "}]}, "source_prompt is blank"),
        ({"domains": [{"name": "z", "prompt": "x", "weights": {"lambda_sds": 2}}]}, r"\['lambda_sds'\] of domain 'z' do nothing for a nada domain"),
        ({"training": {"sds_grad_clip": 0}}, "sds_grad_clip must be > 0"),
        ({"training": {"nada_image_exclusive_of": {"z": "y"}}}, "non-empty list"),
        ({"training": {"nada_image_exclusive_of": {"zombie": ["ghost"]}}}, r"names \['ghost'\], which this run does not train"),  # before any model is loaded
        ({"domains": [{"name": "z", "method": "nada", "prompt": "x", "images": "photos/me"}]}, "images would do nothing for a nada domain"),
        ({"domains": [{"name": "z", "method": "sds", "prompt": "x", "source_prompt": "a face"}]}, "source_prompt would do nothing for a sds domain"),
        ({"domains": [{"name": "z", "prompt": "x", True: 1, "colour": 1}]}, r"unknown keys \[True, 'colour'\]"),  # YAML's `on:` is a bool key
        ({True: 1, "colour": 1}, r"unknown keys \[True, 'colour'\]"),
        ({"domains": [{"name": "me", "method": "mystyle", "images": "photos/me", "prompt": "a zombie"}]}, "prompt would do nothing for a mystyle domain"),
        ({"model": "  "}, "'model' is empty"),  # '' would resolve to the current folder
        ({"domains": [{"name": "z", "prompt": "x", "negative_prompts": 3}]}, "negative_prompts must be a text or a list of texts"),
        ({"domains": [{"name": "z", "prompt": "x", "negative_prompts": ["a hat", " "]}]}, "negative_prompts must be a text or a list of texts"),
        ({"domains": [{"name": "z", "prompt": "x", "negative_prompts": ""}]}, "negative_prompts must be a text or a list of texts"),
        ({"domains": [{"name": "z", "method": "mystyle", "images": "photos/me", "negative_prompts": "a hat"}]}, "negative_prompts would do nothing for a mystyle domain"),
        ({"domains": [{"name": "z", "prompt": "a zombie", "negative_prompts": ["a ghost", "a zombie"]}]}, "lists its own prompt 'a zombie' among its negative prompts"),
        ({"domains": [{"name": "z", "prompt": "x", "negative_prompts": "a hat", "weights": {"lambda_nada_negative": 0}}]}, "its lambda_nada_negative is 0"),
        ({"training": {"negative_prompts": {"zombie": ["a hat"]}}}, r"set a domain's negative prompts in its entry \(negative_prompts: "),
    ],
)
def test_bad_recipes_are_refused_with_a_clear_message(change, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_dict({**GOOD, **change})


def test_recipe_folders_expand_the_home_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    data = {**GOOD, "real_images": "~/faces", "domains": [{"name": "me", "method": "mystyle", "images": "~/photos/me"}]}
    recipe = Recipe.from_dict(data, base_dir=tmp_path / "recipes")
    assert recipe.real_images == str(tmp_path / "faces") and recipe.domains[0].images == str(tmp_path / "photos" / "me")


def test_recipe_numbers_are_read_as_their_settings_types():
    recipe = Recipe.from_dict({**GOOD, "training": {"lambda_gan": 0, "betas": [0, 0.99], "replay_batch_size": None}})
    assert recipe.training.lambda_gan == 0.0 and isinstance(recipe.training.lambda_gan, float)
    assert recipe.training.betas == (0.0, 0.99) and recipe.training.replay_batch_size is None


def test_recipe_negative_prompts_become_the_runs_negative_prompts(tmp_path):
    domains = [{"name": "eyepatch", "prompt": "an eyepatch", "negative_prompts": "sunglasses"}, {"name": "hat", "prompt": "a hat", "negative_prompts": ["a crown", "a cap"]}, {"name": "pop", "prompt": "pop art"}]
    recipe = Recipe.from_dict({**GOOD, "domains": domains})
    assert recipe.training.negative_prompts == {"eyepatch": ["sunglasses"], "hat": ["a crown", "a cap"]}
    # A variant replaces a domain's negative prompts whole, and null (or []) drops them.
    _write_yaml(tmp_path / "parent.yaml", {**GOOD, "domains": domains})
    (tmp_path / "variant.yaml").write_text("extends: parent.yaml\ndomains:\n  - {name: eyepatch, negative_prompts: [dark shades]}\n  - {name: hat, negative_prompts: null}\n  - {name: pop, negative_prompts: []}\n")
    assert Recipe.load(tmp_path / "variant.yaml").training.negative_prompts == {"eyepatch": ["dark shades"]}
    mystyle = Recipe.from_dict({**GOOD, "domains": [{"name": "me", "method": "mystyle", "images": "photos/me", "negative_prompts": []}]})  # [] is none
    assert mystyle.training.negative_prompts == {}


def test_recipe_domain_weights_override_the_training_weights_for_that_domain():
    domains = [{"name": "zombie", "prompt": "a zombie", "weights": {"lambda_nada_consistency": 0.3, "lambda_nada": 2}}, {"name": "hat", "prompt": "a hat"}]
    recipe = Recipe.from_dict({**GOOD, "domains": domains, "training": {"lambda_nada_consistency": 1.0}})
    assert recipe.training.domain_weights == {"zombie": {"lambda_nada_consistency": 0.3, "lambda_nada": 2.0}}
    assert recipe.training.weight("lambda_nada_consistency", "zombie") == 0.3
    assert recipe.training.weight("lambda_nada_consistency", "hat") == 1.0
    assert recipe.training.weight("lambda_nada", "hat") == 1.0


def test_compose_recipe_differs_from_the_nada_recipe_only_in_consistency_weights_and_composed_edits():
    base, compose = (Recipe.load(RECIPES / name) for name in ("world-nada-10.yaml", "world-nada-10-compose.yaml"))
    assert compose.model == base.model and compose.guidance == base.guidance
    assert [d.to_dict() for d in compose.domains] == [d.to_dict() for d in base.domains]
    tuned = {"lambda_nada_consistency": None, "domain_weights": None, "lambda_composed_edits": None}
    assert asdict(compose.training) | tuned == asdict(base.training) | tuned
    assert compose.training.lambda_composed_edits == 2.0 and base.training.lambda_composed_edits == 0.0


def test_a_key_written_twice_in_a_recipe_is_refused(tmp_path):
    # Plain YAML keeps the last copy: the first block's settings, or the first prompt, would vanish.
    twice = {
        "training": "model: world-portraits\ntraining:\n  steps: 1200\ntraining:\n  seed: 3\ndomains:\n  - {name: z, prompt: x}\n",
        "prompt": "model: world-portraits\ndomains:\n  - name: glasses\n    prompt: a portrait of a person with glasses\n    prompt: a portrait of a zombie\n",
    }
    for key, text in twice.items():
        (tmp_path / "r.yaml").write_text(text)
        with pytest.raises(RecipeError, match=f"key '{key}' appears twice in one mapping"):
            Recipe.load(tmp_path / "r.yaml")
    # A merge that overrides a key is not a duplicate, even once merged again into another mapping.
    (tmp_path / "r.yaml").write_text("model: world-portraits\nbase: &b {<<: {name: z, prompt: x}, prompt: y}\nagain: {<<: *b}\ndomains:\n  - {<<: *b, prompt: w}\n")
    with pytest.raises(RecipeError, match=r"unknown keys \['again', 'base'\]"):
        Recipe.load(tmp_path / "r.yaml")


def test_recipe_that_is_not_yaml(tmp_path):
    for content in (b"model: [unclosed", b"\xfd\xfe binary"):
        (tmp_path / "r.yaml").write_bytes(content)
        with pytest.raises(RecipeError, match="not valid YAML"):
            Recipe.load(tmp_path / "r.yaml")


def _write_yaml(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_a_recipe_that_extends_a_shipped_one_is_that_recipe_with_its_changes(tmp_path):
    # The compose recipe written as a variant of the NADA one: the same Recipe, field for field.
    variant = _write_yaml(tmp_path / "compose.yaml", {
        "extends": str(RECIPES / "world-nada-10.yaml"),
        "out": "runs/world-nada-10-compose",
        "name": "world-nada-10-compose",
        "description": "Portraits world expanded with 10 NADA domains that compose (per-domain cross-domain consistency, composed edits).",
        "training": {"lambda_nada_consistency": 1.0, "lambda_composed_edits": 2.0},
        "domains": [
            {"name": "eyepatch", "weights": {"lambda_nada_consistency": 0.3, "lambda_nada": 1.5}},
            {"name": "blue_skin", "weights": {"lambda_nada_consistency": 0.3}},
            {"name": "freckles", "weights": {"lambda_nada_consistency": 0.3, "lambda_nada": 1.5}},
        ],
    })
    assert Recipe.load(variant) == Recipe.load(RECIPES / "world-nada-10-compose.yaml")


def test_recipe_variants_merge_settings_and_domains_by_name_and_keep_the_parents_folders(tmp_path):
    _write_yaml(tmp_path / "base" / "parent.yaml", {
        "model": "world-portraits", "out": "runs/parent", "real_images": "faces",
        "guidance": {"clip": ["world"], "perceptual": "auto"},
        "training": {"steps": 300, "seed": 1, "lambda_nada_consistency": 1.0},
        "domains": [
            {"name": "zombie", "prompt": "a zombie", "weights": {"lambda_nada": 2.0, "lambda_nada_consistency": 0.3}},
            {"name": "me", "method": "mystyle", "images": "photos/me"},
            {"name": "hat", "prompt": "a hat"},
        ],
    })
    _write_yaml(tmp_path / "variants" / "child.yaml", {
        "extends": "../base/parent.yaml",
        "out": "runs/child",
        "guidance": {"clip": ["world", "world-b"]},
        "training": {"seed": 3},
        "domains": [
            {"name": "zombie", "prompt": "a portrait of a zombie", "weights": {"lambda_nada": None, "lambda_nada_exclusive": 0.2}},
            {"name": "ghost", "prompt": "a ghost"},
        ],
        "remove_domains": ["hat"],
    })
    grandchild = _write_yaml(tmp_path / "variants" / "deeper" / "grandchild.yaml", {"extends": "../child.yaml", "training": {"steps": 600}})

    recipe = Recipe.load(grandchild)
    # out and name are each recipe's own: the grandchild names no folder, so `expand --out` must
    assert recipe.model == "world-portraits" and recipe.out is None and Recipe.load(tmp_path / "variants" / "child.yaml").out == "runs/child"
    assert recipe.guidance == {"clip": ["world", "world-b"], "perceptual": "auto"}
    assert (recipe.training.steps, recipe.training.seed, recipe.training.lambda_nada_consistency) == (600, 3, 1.0)
    assert [(d.name, d.prompt) for d in recipe.domains] == [("zombie", "a portrait of a zombie"), ("me", None), ("ghost", "a ghost")]
    # zombie's 2.0x pull is dropped (null), its consistency kept, its new hinge added
    assert recipe.training.domain_weights == {"zombie": {"lambda_nada_consistency": 0.3, "lambda_nada_exclusive": 0.2}}
    # folders stay relative to the file that names them
    assert recipe.domains[1].images == str((tmp_path / "base" / "photos" / "me").resolve())
    assert recipe.real_images == str((tmp_path / "base" / "faces").resolve())


def test_a_recipe_variant_keeps_the_parents_blocks_when_its_own_are_empty_and_can_replace_a_domain_whole(tmp_path):
    _write_yaml(tmp_path / "parent.yaml", {
        "model": "world-portraits", "out": "runs/parent", "name": "parent-run", "description": "Two domains.",
        "guidance": {"clip": ["world"]}, "training": {"seed": 1, "nada_image_exclusive_of": {"zombie": ["hat"]}},
        "domains": [{"name": "zombie", "prompt": "a zombie", "weights": {"lambda_nada_image_exclusive": 0.5}}, {"name": "hat", "prompt": "a hat"}],
    })
    # `training:` with only comments under it is null in YAML: it must not wipe the parent's settings
    (tmp_path / "empty.yaml").write_text("extends: parent.yaml\nout: runs/empty\ntraining:\n  # seed: 3\nguidance:\ndomains:\n  - {name: zombie, weights: }\n")
    recipe = Recipe.load(tmp_path / "empty.yaml")
    assert recipe.training.seed == 1 and recipe.training.nada_image_exclusive_of == {"zombie": ["hat"]} and recipe.guidance == {"clip": ["world"]}
    assert recipe.training.domain_weights == {"zombie": {"lambda_nada_image_exclusive": 0.5}}
    assert (recipe.out, recipe.name, recipe.description) == ("runs/empty", None, "Two domains.")  # not registered as parent-run
    # a new method for a parent's domain: remove it and write it again, whole
    sds = {"extends": "parent.yaml", "remove_domains": ["hat"], "domains": [{"name": "hat", "method": "sds", "prompt": "a portrait of a person wearing a hat"}]}
    with pytest.raises(RecipeError, match=r"nada_image_exclusive_of names \['hat'\], which this run does not train with nada"):
        Recipe.load(_write_yaml(tmp_path / "sds.yaml", sds))  # the parent's setting still names it
    recipe = Recipe.load(_write_yaml(tmp_path / "sds.yaml", {**sds, "training": {"nada_image_exclusive_of": {}}}))
    assert [(d.name, d.method, d.prompt) for d in recipe.domains] == [("zombie", "nada", "a zombie"), ("hat", "sds", "a portrait of a person wearing a hat")]


@pytest.mark.parametrize(
    "child, message",
    [
        ({"extends": "missing.yaml"}, r"extends 'missing.yaml', but .*missing.yaml is not a recipe file"),
        ({"extends": ""}, "'extends' must be the path of the recipe this one changes"),
        ({"extends": ["parent.yaml"]}, "'extends' must be the path of the recipe this one changes"),
        ({"extends": "child.yaml"}, "recipes extend each other in a loop"),
        ({"extends": "loop.yaml"}, "recipes extend each other in a loop"),
        ({"remove_domains": ["hat"]}, "has no `extends: PARENT.yaml`"),
        ({"extends": "parent.yaml", "remove_domains": ["ghost"]}, r"remove_domains names \['ghost'\], which the recipe it extends does not have; its domains: \['zombie', 'hat'\]"),
        ({"extends": "parent.yaml", "remove_domains": "hat"}, "remove_domains must list domain names"),
        ({"extends": "parent.yaml", "remove_domains": ["hat"], "domains": [{"name": "hat", "alpha": 4.0}]}, "'hat' is in remove_domains, so its entry here is a whole new domain"),
        ({"extends": "parent.yaml", "domains": [{"name": "zombi", "weights": {"lambda_nada": 2.0}}]}, r"domain 'zombi' is not in the recipe it extends \(its domains: \['zombie', 'hat'\]\); did you mean 'zombie'\?"),
        ({"extends": "broken.yaml"}, r"broken.yaml \(extended by .*child.yaml\) is not valid YAML"),
        ({"extends": "parent.yaml", "domains": [{"name": "hat", "alpha": 4.0}, {"name": "hat", "alpha": 5.0}]}, "domain 'hat' is changed twice"),
        ({"extends": "parent.yaml", "remove_domains": ["zombie", "hat"]}, "needs a non-empty 'domains' list"),
        ({"extends": "parent.yaml", "training": {"stepz": 3}}, r"child.yaml \(with .*parent.yaml, which it extends\).*stepz"),
        ({"extends": "parent.yaml", "domains": [{"name": "zombie", "method": "mystyle", "images": "photos"}]}, "prompt would do nothing for a mystyle domain"),
    ],
)
def test_bad_recipe_variants_are_refused_with_a_clear_message(tmp_path, child, message):
    _write_yaml(tmp_path / "parent.yaml", {"model": "m", "out": "o", "domains": [{"name": "zombie", "prompt": "a zombie"}, {"name": "hat", "prompt": "a hat"}]})
    _write_yaml(tmp_path / "loop.yaml", {"extends": "child.yaml"})
    (tmp_path / "broken.yaml").write_text("model: [unclosed")
    with pytest.raises(RecipeError, match=message):
        Recipe.load(_write_yaml(tmp_path / "child.yaml", child))


def test_extends_is_read_only_from_recipe_files():
    with pytest.raises(RecipeError, match=r"\['extends'\] can only be read from a recipe file"):
        Recipe.from_dict({**GOOD, "extends": "parent.yaml"})


# ---- the real-model code paths: one training step with every guidance kind ---------------------------


def test_a_transformers_clip_loads_in_float32_and_cuts_long_prompts_with_a_warning(tiny_clip_dir, tmp_path):
    from transformers import CLIPModel

    CLIPModel.from_pretrained(tiny_clip_dir).half().save_pretrained(tiny_clip_dir)  # a checkpoint saved in fp16
    guidance = ClipGuidance.from_pretrained([str(tiny_clip_dir)])
    (encoder,) = guidance.encoders
    assert {p.dtype for p in encoder.model.parameters()} == {torch.float32}
    assert encoder.encode_images(torch.zeros(2, 3, 16, 16)).shape == (2, 8)
    long_prompt = " ".join(["a photo of a person with glasses"] * 4)  # 30 tokens; the tiny CLIP reads 16
    with pytest.warns(UserWarning, match="CLIP reads at most 16 tokens"):
        embeddings = encoder.encode_text([long_prompt, "a zombie"])
    assert embeddings.shape == (2, 8) and torch.isfinite(embeddings).all()


def test_one_step_with_transformers_clip_diffusers_sd_and_lpips(tiny_generator, tiny_discriminator, tiny_clip_dir, tiny_sd_dir):
    assert tiny_generator.resolution == TINY_SD_RESOLUTION
    model = ExpandedGenerator.from_generator(tiny_generator, tiny_discriminator, alpha=3.0, num_dormant=8, base_model="tiny-real")
    for domain in (Domain("zombie", -1, "nada", prompt="a zombie"), Domain("sketch", -1, "sds", prompt="a sketch"), Domain("me", -1, "mystyle", images="x")):
        model.add_domain(domain)
    perceptual = lpips_distance("alex", pretrained=False)  # the lpips package's network, random backbone (offline)
    teacher = StableDiffusionGuidance.from_pretrained(str(tiny_sd_dir), resolution=TINY_SD_RESOLUTION)
    subject = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    guidance = Guidance(
        perceptual=perceptual,
        clip=ClipGuidance.from_pretrained([str(tiny_clip_dir)]),
        teacher=ScoreDistillation(teacher, SdsConfig(lambda_directional=1.0)),
        mystyle_targets={"me": (subject, invert_images(model.generator, subject, perceptual, steps=2, progress=False))},
    )
    before = [p.clone() for p in model.generator.synthesis_parameters()]
    trainer = Expander(model, list(model.domains), guidance, ExpansionConfig(steps=1, batch_size=2, base_batch_size=2, domains_per_step=3))
    losses = trainer.step()
    assert {"loss_nada", "loss_sds", "loss_mystyle", "loss_replay_l2", "loss_replay_perceptual"} <= set(losses)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values()), losses
    assert any(not torch.equal(a, b) for a, b in zip(before, model.generator.synthesis_parameters()))
    # The run's SDS settings are what the checkpoint records: a teacher built with others is refused.
    guidance.teacher = ScoreDistillation(teacher, SdsConfig(t_max=0.8))
    with pytest.raises(ValueError, match=r"t_max: 0.8 in the teacher, 0.5 in the training settings"):
        Expander(model, list(model.domains), guidance, ExpansionConfig(steps=1, batch_size=2, base_batch_size=2))
    guidance.teacher = ScoreDistillation(teacher, ExpansionConfig(sds_t_max=0.8).sds_config())
    Expander(model, list(model.domains), guidance, ExpansionConfig(steps=1, batch_size=2, base_batch_size=2, sds_t_max=0.8))


# ---- the CLI: add-domain and expand ------------------------------------------------------------------


@pytest.fixture
def home() -> Path:
    """This test's private $EXPANDER_HOME (set for every test in conftest.py)."""
    return Path(os.environ["EXPANDER_HOME"])


@pytest.fixture
def parent_dir(tmp_path, tiny_generator, tiny_discriminator):
    model = ExpandedGenerator.from_generator(tiny_generator, tiny_discriminator, alpha=3.0, num_dormant=8, base_model="tiny")
    model.basis.dormancy = torch.linspace(1.0, 0.01, 32)
    model.save_pretrained(tmp_path / "parent")
    return tmp_path / "parent"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


GUIDE = ("--perceptual", "lpips-alex")  # lpips' real network; its backbone weights are absent offline


@pytest.fixture
def offline_lpips(monkeypatch):
    """lpips-alex with a random backbone: the lpips package code path, without torchvision downloads."""
    import expander.guidance.perceptual as perceptual

    monkeypatch.setattr(perceptual, "lpips_distance", lambda net="vgg", pretrained=True: lpips_distance(net, pretrained=False))


def test_add_domain_three_times_keeps_every_domain(parent_dir, tiny_clip_dir, tmp_path, home, offline_lpips):
    out = tmp_path / "expanded"
    first = run("add-domain", "a zombie", "--model", parent_dir, "--out", out, "--steps", 2, "--clip", tiny_clip_dir, *GUIDE)
    assert first.exit_code == 0, first.output
    assert "added 'zombie'" in first.output
    settings = ("--set", "replay_batch_size=3", "--set", "nada_contrast=0", "--set", "lambda_nada_exclusive=0.2", "--negative-prompt", "a photo")  # any ExpansionConfig field
    for prompt in ("a sketch", "a person with glasses"):
        result = run("add-domain", prompt, "--model", out, "--out", out, "--steps", 2, "--clip", tiny_clip_dir, *GUIDE, *settings)
        assert result.exit_code == 0, result.output
    model = ExpandedGenerator.from_pretrained(out)
    assert model.domain_names == ["zombie", "sketch", "glasses"]
    assert len({d.direction for d in model.domains}) == 3
    assert all(d.direction in model.dormant_directions() for d in model.domains)
    assert all(d.steps == 2 for d in model.domains)
    assert not list(tmp_path.glob(".expanded.state*")), "training state must be cleaned up"
    # Each call's run is logged in the checkpoint (training.json), after the runs before it.
    runs = model.training_log
    assert [r["trained"] for r in runs] == [["zombie"], ["sketch"], ["glasses"]]
    assert [r["replayed"] for r in runs] == [[], ["zombie"], ["zombie", "sketch"]]
    assert runs[0]["settings"]["lambda_nada_exclusive"] == 0.0 and runs[2]["settings"]["lambda_nada_exclusive"] == 0.2
    assert runs[2]["settings"]["replay_batch_size"] == 3 and runs[2]["guidance"]["clip"] == [str(tiny_clip_dir)]
    assert runs[0]["settings"]["negative_prompts"] == {} and runs[2]["settings"]["negative_prompts"] == {"glasses": ["a photo"]}
    info = run("info", out)
    assert info.exit_code == 0 and "training:     3 runs" in info.output and "1 domains, 2 steps, seed 0" in info.output, info.output


def test_add_domain_settings_are_parsed_like_a_recipe():
    from expander.cli import _training_settings

    parsed = _training_settings(("replay_batch_size=8", "nada_contrast=0.5", "betas=[0.9, 0.99]", "nada_contrast_x = true"))
    assert parsed == {"replay_batch_size": 8, "nada_contrast": 0.5, "betas": [0.9, 0.99], "nada_contrast_x": True}


def test_a_run_whose_loss_turns_nan_stops_with_a_message_and_writes_nothing(parent_dir, tiny_clip_dir, tmp_path, home, monkeypatch):
    import expander.train

    monkeypatch.setattr(expander.train, "loss_replay", lambda images, parent_images, perceptual: (images.mean() * float("nan"), images.mean() * 0))
    result = run("add-domain", "a zombie", "--model", parent_dir, "--out", tmp_path / "out", "--steps", 2, "--clip", tiny_clip_dir, "--perceptual", "world")
    assert result.exit_code != 0 and "training stopped at step 0: loss_replay_l2 = nan" in result.output, result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.state").exists()


def test_add_domain_refuses_what_it_would_lose_or_ignore(parent_dir, tiny_clip_dir, tmp_path, home):
    other = ExpandedGenerator.from_pretrained(parent_dir)
    other.add_domain(Domain("sketch", direction=-1, prompt="a sketch"))
    other.save_pretrained(tmp_path / "other")
    before = _snapshot(tmp_path / "other")
    guide = ("--clip", tiny_clip_dir, "--perceptual", "world", "--steps", 1)
    refused = run("add-domain", "a zombie", "--model", parent_dir, "--out", tmp_path / "other", *guide)
    assert refused.exit_code != 0 and "holds another model, with domains ['sketch']" in refused.output, refused.output
    assert _snapshot(tmp_path / "other") == before
    replaced = run("add-domain", "a zombie", "--model", parent_dir, "--out", tmp_path / "other", "--overwrite", *guide)
    assert replaced.exit_code == 0 and ExpandedGenerator.from_pretrained(tmp_path / "other").domain_names == ["zombie"], replaced.output
    again = run("add-domain", "a zombie", "--model", parent_dir, "--out", tmp_path / "other", *guide)  # the same model again: no --overwrite needed
    assert again.exit_code == 0, again.output

    resumed = run("add-domain", "a ghost", "--model", parent_dir, "--out", tmp_path / "new", "--resume", *guide)  # nothing to resume
    assert resumed.exit_code != 0 and "no training state in" in resumed.output and "run without --resume" in resumed.output, resumed.output
    assert not (tmp_path / "new").exists()
    photos = run("add-domain", "a zombie", "--images", "world:subject:1", "--model", parent_dir, "--out", tmp_path / "new")
    assert photos.exit_code != 0 and "not from a PROMPT ('a zombie' would be ignored)" in photos.output, photos.output
    unnamed = run("add-domain", "ein Porträt mit Hut", "--model", parent_dir, "--out", tmp_path / "new")
    assert unnamed.exit_code != 0 and "(the name was derived from the prompt); pass --name NAME" in unnamed.output, unnamed.output
    assert not (tmp_path / "new").exists()


def test_add_domain_mystyle_from_a_folder(parent_dir, tmp_path, home, offline_lpips, monkeypatch):
    import expander.expansion

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        Image.fromarray((torch.rand(20, 24, 3, generator=torch.Generator().manual_seed(i)) * 255).byte().numpy()).save(photos / f"{i}.png")
    inversion_steps = []

    def counted_inversion(*args, steps, **kwargs):
        inversion_steps.append(steps)
        return invert_images(*args, steps=steps, **kwargs)

    monkeypatch.setattr(expander.expansion, "invert_images", counted_inversion)
    settings = ("--set", "mystyle_inversion_steps=7")  # a training setting, like a recipe's
    result = run("add-domain", "--images", photos, "--name", "me", "--model", parent_dir, "--out", tmp_path / "out", "--steps", 2, *settings, *GUIDE)
    assert result.exit_code == 0, result.output
    assert inversion_steps == [7]
    model = ExpandedGenerator.from_pretrained(tmp_path / "out")
    assert model.get_domain("me").method == "mystyle" and model.get_domain("me").images == str(photos)
    # The subject's three inversions travel with the checkpoint and are what the domain samples from.
    anchors = model.anchors("me")
    assert anchors is not None and anchors.shape == (3, model.generator.style_dim)
    assert model.sample("me", n=2, seed=0).shape == (2, 3, model.generator.resolution, model.generator.resolution)


@pytest.mark.parametrize(
    "args, message",
    [
        (("   ",), "non-empty PROMPT"),
        (("--method", "mystyle"), "needs --images"),
        (("--images", "{empty}"), "has no images"),
        (("--images", "{unreadable}"), "cannot read image"),
        (("--images", "{missing}"), "image folder not found"),
        (("a ghost", "--direction", "{taken}"), "already used"),
        (("a ghost", "--direction", 0), "not dormant"),
        (("a ghost", "--direction", 999), "out of range"),
        (("a ghost", "--name", "zombie"), "already has a domain"),
        (("a ghost", "--set", "no_such_setting=1"), "unknown training settings"),
        (("a ghost", "--set", "replay_batch_size=eight"), "replay_batch_size must be an integer"),
        (("a ghost", "--set", "replay_batch_size"), "needs KEY=VALUE"),
        (("a ghost", "--set", "replay_batch_sise=8"), "replay_batch_sise: did you mean replay_batch_size?"),
        (("a ghost", "--set", "source_prompt="), "has an empty value"),
        (("a ghost", "--set", "steps=3"), "use --steps"),
        (("a ghost", "--set", "betas=[0.9"), "cannot read the value"),
        (("a ghost", "--negative-prompt", "a ghost"), "lists its own prompt 'a ghost' among its negative prompts"),
        (("a ghost", "--negative-prompt", " "), "a non-empty list of non-blank texts"),
        (("a ghost", "--negative-prompt", "a hat", "--set", "lambda_nada_negative=0"), "its lambda_nada_negative is 0"),
        (("a ghost", "--set", "negative_prompts={{ghost: [a hat]}}"), "use --negative-prompt TEXT"),
        (("--images", "{empty}", "--negative-prompt", "a hat"), "--negative-prompt steers a text domain (nada, sds)"),
        (("a ghost", "--device", "tpu9"), "unknown device 'tpu9'"),
        (("a ghost", "--real-images", "{empty}"), "has no images"),
        (("a ghost", "--real-images", "{unreadable}"), "cannot read image"),
        (("a ghost", "--real-images", "{missing}"), "image folder not found"),
    ],
)
def test_add_domain_bad_input_writes_nothing(args, message, parent_dir, tmp_path, home, tiny_clip_dir):
    model = ExpandedGenerator.from_pretrained(parent_dir)
    model.add_domain(Domain("zombie", direction=-1, prompt="a zombie"))
    model.save_pretrained(parent_dir)
    (tmp_path / "empty").mkdir()
    (tmp_path / "unreadable").mkdir()
    (tmp_path / "unreadable" / "broken.png").write_bytes(b"not a png")
    fill = {"empty": tmp_path / "empty", "unreadable": tmp_path / "unreadable", "missing": tmp_path / "nope", "taken": model.get_domain("zombie").direction}
    args = [str(a).format(**fill) if isinstance(a, str) else a for a in args]
    before = _snapshot(parent_dir)
    result = run("add-domain", *args, "--model", parent_dir, "--steps", 1, "--clip", tiny_clip_dir)
    assert result.exit_code != 0
    assert message in result.output, result.output
    assert _snapshot(parent_dir) == before, "a refused add-domain must not touch the model"
    assert not (home / "registry.json").exists()


def test_add_domain_into_the_current_folder_is_refused_before_training(parent_dir, home, tiny_clip_dir, monkeypatch):
    # `cd my-model && expander add-domain ... --model .` writes back to '.', whose swap would pull the
    # folder out from under the process: refused before the run, not after it.
    monkeypatch.chdir(parent_dir)
    before = _snapshot(parent_dir)
    result = run("add-domain", "a ghost", "--model", ".", "--steps", 1, "--clip", tiny_clip_dir)
    assert result.exit_code != 0 and "current folder" in result.output, result.output
    assert "expand:" not in result.output  # no training step was taken
    assert _snapshot(parent_dir) == before


def test_expand_recipe_end_to_end_and_registers_the_result(parent_dir, tiny_clip_dir, tmp_path, home, offline_lpips, monkeypatch):
    recipe = {
        "model": str(parent_dir),
        "out": str(tmp_path / "joint"),
        "name": "tiny-joint",
        "description": "A tiny model with a zombie and a sketch.",
        "guidance": {"clip": str(tiny_clip_dir), "perceptual": "lpips-alex"},
        "training": {"steps": 2, "batch_size": 2, "base_batch_size": 2},
        "domains": [{"name": "zombie", "prompt": "a zombie", "weights": {"lambda_nada": 2.0}, "negative_prompts": "a person with glasses"}, {"name": "sketch", "prompt": "a sketch", "direction": 31}],
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    refused = run("expand", tmp_path / "r.yaml", "--set", "negative_prompts={sketch: [a photo]}", "--out", tmp_path / "other")
    assert refused.exit_code != 0 and "in its recipe entry (negative_prompts:" in refused.output, refused.output
    result = run("expand", tmp_path / "r.yaml")
    assert result.exit_code == 0, result.output
    model = ExpandedGenerator.from_pretrained(tmp_path / "joint")
    assert model.get_domain("sketch").direction == 31
    # The checkpoint says how it was trained, per-domain weights included.
    (logged,) = model.training_log
    assert logged["trained"] == ["zombie", "sketch"] and logged["settings"]["steps"] == 2
    assert logged["settings"]["domain_weights"] == {"zombie": {"lambda_nada": 2.0}}
    assert "per-domain loss weights: zombie `lambda_nada=2.0`" in (tmp_path / "joint" / "README.md").read_text()
    assert logged["settings"]["negative_prompts"] == {"zombie": ["a person with glasses"]}
    assert 'negative prompts: zombie "a person with glasses"' in (tmp_path / "joint" / "README.md").read_text()
    registry = json.loads((home / "registry.json").read_text())
    assert "tiny-joint" in registry["models"]
    # The recipe's description, not the parent's, is the new model's: card, config and registry.
    assert model.description == registry["models"]["tiny-joint"]["description"] == "A tiny model with a zombie and a sketch."
    assert "A tiny model with a zombie and a sketch." in (tmp_path / "joint" / "README.md").read_text()
    listed = run("list")
    assert listed.exit_code == 0 and "tiny-joint" in listed.output and "* world-portraits" in listed.output, listed.output
    (line,) = [row for row in listed.output.splitlines() if "tiny-joint" in row]
    assert " 2 " in line and str((tmp_path / "joint").resolve()) in line  # two domains, and where they live
    sample = run("sample", "--model", "tiny-joint", "--domain", "sketch", "-n", 2, "--out", tmp_path / "s.png")
    assert sample.exit_code == 0, sample.output
    # A variant written elsewhere leaves the recipe's name with the recipe's folder, unless it is given a name.
    variant = run("expand", tmp_path / "r.yaml", "--steps", 1, "--out", tmp_path / "variant")
    assert variant.exit_code == 0 and "not registered as tiny-joint" in variant.output, variant.output
    assert load_registries().models["tiny-joint"].source == {"path": str((tmp_path / "joint").resolve())}
    named = run("expand", tmp_path / "r.yaml", "--steps", 1, "--out", tmp_path / "named", "--name", "tiny-variant")
    assert named.exit_code == 0 and "registered as tiny-variant" in named.output, named.output
    assert load_registries().models["tiny-variant"].source == {"path": str((tmp_path / "named").resolve())}
    assert load_registries().models["tiny-joint"].source == {"path": str((tmp_path / "joint").resolve())}
    # A name another run took while this one trained (the CLI's early check passed): the model is saved
    # and finished (no training state left), the other model keeps its name, and the error says where.
    monkeypatch.setattr("expander.registry.check_name_available", lambda *args: None)
    raced = run("expand", tmp_path / "r.yaml", "--steps", 1, "--out", tmp_path / "raced", "--name", "tiny-variant")
    assert raced.exit_code != 0 and f"saved the model in {(tmp_path / 'raced').resolve()} but did not register it" in raced.output, raced.output
    assert ExpandedGenerator.from_pretrained(tmp_path / "raced").domain_names == ["zombie", "sketch"] and not (tmp_path / ".raced.state").exists()
    assert load_registries().models["tiny-variant"].source == {"path": str((tmp_path / "named").resolve())}


def test_expand_recipe_with_a_duplicate_domain_writes_nothing(parent_dir, tmp_path, home):
    recipe = {"model": str(parent_dir), "out": str(tmp_path / "joint"), "domains": [{"name": "a", "prompt": "x"}, {"name": "a", "prompt": "y"}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    result = run("expand", tmp_path / "r.yaml")
    assert result.exit_code != 0 and "duplicate domain name 'a'" in result.output
    assert not (tmp_path / "joint").exists()


def test_expand_resume_continues_a_killed_run_and_refuses_a_changed_recipe(parent_dir, tiny_clip_dir, tmp_path, home, monkeypatch):
    recipe = {
        "model": str(parent_dir),
        "out": str(tmp_path / "joint"),
        "guidance": {"clip": str(tiny_clip_dir), "perceptual": "world"},
        "training": {"steps": 2, "batch_size": 1, "base_batch_size": 1, "checkpoint_every": 1},
        "domains": [{"name": "zombie", "prompt": "a zombie"}],
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))

    def killed(*args, **kwargs):
        raise RuntimeError("killed while saving")

    with monkeypatch.context() as patch:  # the run dies after its last step, before the checkpoint is written
        patch.setattr(ExpandedGenerator, "save_pretrained", killed)
        with pytest.raises(RuntimeError, match="killed"):
            run("expand", tmp_path / "r.yaml")
    state = tmp_path / ".joint.state"
    assert (state / "state.json").exists() and not (tmp_path / "joint").exists()

    recipe["training"]["lr"] = 0.01
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))

    def no_guidance(*args, **kwargs):
        raise AssertionError("guidance models loaded before the resume was checked")

    with monkeypatch.context() as patch:  # refused before the (for real models, minutes of) guidance loading
        patch.setattr("expander.guidance.build.build_guidance", no_guidance)  # imported by run_expansion when it runs
        refused = run("expand", tmp_path / "r.yaml", "--resume")
    assert refused.exit_code != 0 and "lr: 0.002 in the state, 0.01 now" in refused.output, refused.output
    assert "Resume with the recipe that started it" in refused.output
    assert not (tmp_path / "joint").exists() and (state / "state.json").exists()
    del recipe["training"]["lr"]
    recipe["guidance"]["clip"] = [str(tiny_clip_dir)] * 2  # an ensemble: another guidance, same settings
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    refused = run("expand", tmp_path / "r.yaml", "--resume")
    assert refused.exit_code != 0 and "guidance: {'clip': '" in refused.output and "now" in refused.output, refused.output

    recipe["guidance"]["clip"] = str(tiny_clip_dir)
    other_parent = ExpandedGenerator.from_pretrained(parent_dir)  # same config and domains, other weights
    with torch.no_grad():
        next(other_parent.generator.parameters()).mul_(1.01)
    other_parent.save_pretrained(tmp_path / "other-parent")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({**recipe, "model": str(tmp_path / "other-parent")}))
    refused = run("expand", tmp_path / "r.yaml", "--resume")
    assert refused.exit_code != 0 and "parent_weights_sha256" in refused.output, refused.output
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    result = run("expand", tmp_path / "r.yaml", "--resume", "--steps", 3)  # and one step more than the killed run
    assert result.exit_code == 0, result.output
    assert ExpandedGenerator.from_pretrained(tmp_path / "joint").get_domain("zombie").steps == 3
    assert not state.exists()


def test_expand_keep_state_lets_a_finished_run_train_longer_exactly(parent_dir, tiny_clip_dir, tmp_path, home):
    recipe = {
        "model": str(parent_dir),
        "guidance": {"clip": str(tiny_clip_dir), "perceptual": "world"},
        "training": {"steps": 2, "batch_size": 1, "base_batch_size": 1, "checkpoint_every": 5},
        "domains": [{"name": "zombie", "prompt": "a zombie"}],
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    cpu = ("--device", "cpu")  # bit for bit on the CPU; GPU kernels are not deterministic
    overrides = ("--seed", 1, "--set", "lambda_nada=0.5")  # the printed command must repeat them, or the resume is refused
    short = run("expand", tmp_path / "r.yaml", "--out", tmp_path / "joint", "--keep-state", *overrides, *cpu)
    assert short.exit_code == 0, short.output
    state = tmp_path / ".joint.state"
    assert (state / "state.json").exists() and "--resume --steps N" in short.output, short.output
    assert ExpandedGenerator.from_pretrained(tmp_path / "joint").get_domain("zombie").steps == 2

    hint = shlex.split(short.output.split("train this run longer with: ")[1].strip())
    assert hint[:2] == ["expander", "expand"] and hint[-1] == "N"
    longer = run(*hint[1:-1], 3, *cpu)  # the printed command, with N = 3
    assert longer.exit_code == 0, longer.output
    assert not state.exists()  # without --keep-state this time
    straight = run("expand", tmp_path / "r.yaml", "--out", tmp_path / "straight", "--steps", 3, *overrides, *cpu)
    assert straight.exit_code == 0, straight.output
    continued, reference = (ExpandedGenerator.from_pretrained(tmp_path / name) for name in ("joint", "straight"))
    assert continued.get_domain("zombie").steps == 3
    expected = reference.generator.state_dict()
    for key, value in continued.generator.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)


def test_expand_overrides_recipe_settings_from_the_command_line(parent_dir, tiny_clip_dir, tmp_path, home):
    recipe = {
        "model": str(parent_dir),
        "out": str(tmp_path / "joint"),
        "guidance": {"clip": str(tiny_clip_dir), "perceptual": "world"},
        "training": {"steps": 5, "batch_size": 1, "base_batch_size": 1, "lambda_nada": 2.0},
        "domains": [{"name": "zombie", "prompt": "a zombie", "weights": {"lambda_nada": 3.0}}],
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    for args, message in [
        (["--set", "lambda_nada=-1"], "lambda_nada must be >= 0"),
        (["--set", "no_such_setting=1"], "unknown training settings ['no_such_setting']"),
        (["--set", "steps=3"], "use --steps instead"),
        (["--seed", "-1"], "Invalid value for '--seed': -1 is not in the range 0<=x<="),
    ]:
        refused = run("expand", tmp_path / "r.yaml", *args)
        assert refused.exit_code != 0 and message in refused.output, refused.output
        assert not (tmp_path / "joint").exists()
    result = run("expand", tmp_path / "r.yaml", "--steps", 1, "--seed", 3, "--set", "lambda_nada=0.5", "--set", "betas=[0.0, 0.9]")
    assert result.exit_code == 0, result.output
    (logged,) = ExpandedGenerator.from_pretrained(tmp_path / "joint").training_log
    settings = logged["settings"]
    assert (settings["steps"], settings["seed"], settings["lambda_nada"], settings["betas"]) == (1, 3, 0.5, [0.0, 0.9])
    assert settings["domain_weights"] == {"zombie": {"lambda_nada": 3.0}}  # the recipe's per-domain weights are kept
    refused = run("expand", tmp_path / "r.yaml", "--set", "domain_weights={zombie: {lambda_nada: 1.0}}", "--out", tmp_path / "other")
    assert refused.exit_code != 0 and "set a domain's loss weights in its recipe entry" in refused.output and not (tmp_path / "other").exists()


def test_expand_never_takes_over_another_models_name(parent_dir, tiny_clip_dir, tmp_path, home, monkeypatch):
    from expander.registry import Registry, entry_for_model, register_user_model, user_registry_path

    monkeypatch.setenv("HOME", str(tmp_path / "user"))  # `out: ~/joint` below
    monkeypatch.chdir(tmp_path)

    pulled = ExpandedGenerator.from_pretrained(parent_dir)
    register_user_model(entry_for_model("mine", {"repo_id": "me/mine", "revision": "a" * 40}, pulled))
    recipe = _one_step_recipe(parent_dir, tiny_clip_dir, out="~/joint", name="mine")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    refused = run("expand", tmp_path / "r.yaml")
    assert refused.exit_code != 0 and "'mine' is already the registered name of another model (me/mine@aaaaaaaaaa), so nothing was trained" in refused.output
    assert Registry.load(user_registry_path()).models["mine"].source["repo_id"] == "me/mine"
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({**recipe, "name": "mine-2"}))
    result = run("expand", tmp_path / "r.yaml")  # `out: ~/joint` is the home folder's, not a folder named '~'
    assert result.exit_code == 0, result.output
    assert (tmp_path / "user" / "joint" / "config.json").is_file() and not (tmp_path / "~").exists()
    again = run("expand", tmp_path / "r.yaml", "--steps", 2)  # the same recipe again: its own name, a new version
    assert again.exit_code == 0, again.output


def _photos(folder: Path, n: int, size: int = 24) -> Path:
    folder.mkdir(parents=True)
    rng = torch.Generator().manual_seed(0)
    for i in range(n):
        pixels = (torch.rand(size, size + 8, 3, generator=rng) * 255).to(torch.uint8).numpy()  # not square: centre-cropped
        Image.fromarray(pixels).save(folder / f"{i}.png")
    return folder


def test_photos_are_read_upright_as_their_exif_orientation_says(tmp_path):
    from expander.utils.images import load_image

    upright = np.zeros((16, 16, 3), dtype=np.uint8)
    upright[:4] = (255, 0, 0)  # red band on top, as a viewer shows the photo
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # how a phone stores it on its side (counter-clockwise)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    stored.save(tmp_path / "phone.png", exif=exif)
    Image.fromarray(upright).save(tmp_path / "plain.png")
    torch.testing.assert_close(load_image(tmp_path / "phone.png", 16), load_image(tmp_path / "plain.png", 16))


def test_image_folder_sampler_draws_seeded_batches_from_disk(tmp_path):
    from expander.utils.images import ImageFolderSampler

    _photos(tmp_path / "faces" / "00000", 3)  # FFHQ's layout: numbered subfolders
    _photos(tmp_path / "faces" / "01000", 2)
    sampler = ImageFolderSampler(tmp_path / "faces", resolution=16)
    assert len(sampler) == 5
    batch = sampler(7, torch.Generator().manual_seed(1))  # more than the folder holds: with replacement
    assert batch.shape == (7, 3, 16, 16) and batch.min() >= -1 and batch.max() <= 1
    assert torch.equal(batch, sampler(7, torch.Generator().manual_seed(1)))
    (tmp_path / "faces" / "broken.jpg").write_bytes(b"no jpeg")
    with pytest.raises(ValueError, match="cannot read image .*broken.jpg"):
        ImageFolderSampler(tmp_path / "faces", resolution=16)


def test_a_photo_corrupt_past_its_header_is_dropped_not_fatal(tmp_path, caplog):
    from expander.utils.images import ImageFolderSampler

    folder = _photos(tmp_path / "faces", 1)
    Image.open(folder / "0.png").resize((64, 64)).save(folder / "1.jpg")  # large enough that half of it holds the header
    data = (folder / "1.jpg").read_bytes()
    (folder / "1.jpg").write_bytes(data[: len(data) // 2])  # truncated: its header checks out, its pixels do not decode
    sampler = ImageFolderSampler(folder, resolution=16)
    with caplog.at_level("WARNING"):
        batch = sampler(6, torch.Generator().manual_seed(0))
    assert batch.shape == (6, 3, 16, 16) and [f.name for f in sampler.unreadable] == ["1.jpg"]
    assert "1.jpg" in caplog.text and "left out" in caplog.text
    # a fresh sampler (a resumed run) finds the corrupt file again and draws the same batch
    assert torch.equal(ImageFolderSampler(folder, resolution=16)(6, torch.Generator().manual_seed(0)), batch)
    (folder / "0.png").unlink()
    with pytest.raises(ValueError, match="no readable image is left"):
        ImageFolderSampler(folder, resolution=16)(4, torch.Generator().manual_seed(0))


def test_expand_with_real_photos_trains_the_discriminator_and_records_them(parent_dir, tiny_clip_dir, tmp_path, home):
    _photos(tmp_path / "recipes" / "faces", 4)
    recipe = {
        "model": str(parent_dir),
        "real_images": "faces",  # relative to the recipe, like a domain's images
        "guidance": {"clip": str(tiny_clip_dir), "perceptual": "world"},
        "training": {"steps": 2, "batch_size": 1, "base_batch_size": 2, "r1_every": 1},
        "domains": [{"name": "zombie", "prompt": "a zombie"}],
    }
    (tmp_path / "recipes" / "r.yaml").write_text(yaml.safe_dump(recipe))
    for out, extra in (("with", ()), ("without", ("--set", "lambda_gan=0"))):
        result = run("expand", tmp_path / "recipes" / "r.yaml", "--out", tmp_path / out, "--device", "cpu", *extra)
        assert result.exit_code == 0, result.output
    parent_d = ExpandedGenerator.from_pretrained(parent_dir).discriminator.state_dict()
    trained = ExpandedGenerator.from_pretrained(tmp_path / "with")
    assert any(not torch.equal(v, parent_d[k]) for k, v in trained.discriminator.state_dict().items())  # the GAN loss ran
    untouched = ExpandedGenerator.from_pretrained(tmp_path / "without")
    assert all(torch.equal(v, parent_d[k]) for k, v in untouched.discriminator.state_dict().items())
    assert "real_images" not in untouched.training_log[0]  # unused photos are not recorded
    assert "GAN loss on the real images" not in (tmp_path / "without" / "README.md").read_text()
    (logged,) = trained.training_log
    assert logged["real_images"] == str((tmp_path / "recipes" / "faces").resolve())
    assert "GAN loss on the real images in `faces`" in (tmp_path / "with" / "README.md").read_text()


def test_real_photos_without_a_discriminator_are_refused_before_anything_is_written(tiny_generator, tiny_clip_dir, tmp_path, home):
    ExpandedGenerator.from_generator(tiny_generator, None, alpha=3.0, num_dormant=8, base_model="tiny").save_pretrained(tmp_path / "no-d")
    recipe = {"model": str(tmp_path / "no-d"), "out": str(tmp_path / "joint"), "real_images": str(_photos(tmp_path / "faces", 2)), "domains": [{"name": "zombie", "prompt": "a zombie"}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    result = run("expand", tmp_path / "r.yaml", "--steps", 1)
    assert result.exit_code != 0 and "needs the model's discriminator" in result.output, result.output
    assert not (tmp_path / "joint").exists() and not (tmp_path / ".joint.state").exists()


def test_training_device_resolves_auto_and_refuses_what_this_machine_lacks(monkeypatch):
    from expander.expansion import training_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert training_device("auto") == training_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="sees no CUDA GPU.*--device cpu"):
        training_device("cuda")
    for device in ("gpu", "mps", "meta", "cpu:1"):  # what expand cannot train on is refused up front
        with pytest.raises(ValueError, match=f"unknown device '{device}'"):
            training_device(device)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert training_device("auto") == torch.device("cuda")
    with pytest.raises(ValueError, match="has 2 CUDA GPU.*cuda:0 .. cuda:1"):
        training_device("cuda:2")


def test_expand_on_a_missing_gpu_is_refused_before_anything_is_written(parent_dir, tiny_clip_dir, tmp_path, home, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    recipe = {"model": str(parent_dir), "out": str(tmp_path / "joint"), "guidance": {"clip": str(tiny_clip_dir), "perceptual": "world"}, "domains": [{"name": "zombie", "prompt": "a zombie"}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    result = run("expand", tmp_path / "r.yaml", "--steps", 1, "--device", "cuda")
    assert result.exit_code != 0 and "sees no CUDA GPU" in result.output, result.output
    assert not (tmp_path / "joint").exists() and not (tmp_path / ".joint.state").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_expand_trains_on_the_gpu_and_resumes_there_from_a_cpu_state(parent_dir, tiny_clip_dir, tmp_path, home):
    recipe = {
        "model": str(parent_dir),
        "real_images": str(_photos(tmp_path / "faces", 3)),  # the GAN loss too, with its discriminator on the GPU
        "guidance": {"clip": str(tiny_clip_dir), "perceptual": "world"},
        "training": {"steps": 2, "batch_size": 2, "base_batch_size": 2, "r1_every": 1},
        "domains": [{"name": "zombie", "prompt": "a zombie"}, {"name": "sketch", "prompt": "a sketch"}],
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    on_cpu = run("expand", tmp_path / "r.yaml", "--out", tmp_path / "joint", "--device", "cpu", "--keep-state")
    assert on_cpu.exit_code == 0, on_cpu.output
    on_gpu = run("expand", tmp_path / "r.yaml", "--out", tmp_path / "joint", "--device", "cuda", "--resume", "--steps", 4)
    assert on_gpu.exit_code == 0, on_gpu.output
    straight = run("expand", tmp_path / "r.yaml", "--out", tmp_path / "gpu", "--device", "cuda", "--steps", 4)
    assert straight.exit_code == 0, straight.output
    for name in ("joint", "gpu"):
        model = ExpandedGenerator.from_pretrained(tmp_path / name)
        assert model.get_domain("sketch").steps == 4
        assert all(torch.isfinite(v).all() for v in model.generator.state_dict().values()), name
    # Resumed on the GPU from a CPU state, or trained there from the start: the same run up to the
    # GPU's arithmetic (the latents are drawn on the CPU either way).
    resumed, straight_model = (ExpandedGenerator.from_pretrained(tmp_path / name).generator.state_dict() for name in ("joint", "gpu"))
    for key, value in resumed.items():
        torch.testing.assert_close(value, straight_model[key], rtol=1e-3, atol=1e-4, msg=key)


def _one_step_recipe(parent_dir, clip_dir, **top) -> dict:
    """A recipe of one zombie domain trained for one step on the tiny parent, plus the ``top`` keys."""
    return {
        "model": str(parent_dir),
        "guidance": {"clip": str(clip_dir), "perceptual": "world"},
        "training": {"steps": 1, "batch_size": 1, "base_batch_size": 1},
        "domains": [{"name": "zombie", "prompt": "a zombie"}],
        **top,
    }


def test_expand_takes_the_output_folder_from_the_command_line_when_the_recipe_has_none(parent_dir, tiny_clip_dir, tmp_path, home):
    recipe = _one_step_recipe(parent_dir, tiny_clip_dir)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    refused = run("expand", tmp_path / "r.yaml")
    assert refused.exit_code != 0 and "pass --out FOLDER" in refused.output
    result = run("expand", tmp_path / "r.yaml", "--out", tmp_path / "joint")
    assert result.exit_code == 0, result.output
    assert ExpandedGenerator.from_pretrained(tmp_path / "joint").domain_names == ["zombie"]


def test_expand_trains_a_recipe_variant_and_refuses_to_resume_it_after_its_parent_changed(parent_dir, tiny_clip_dir, tmp_path, home, monkeypatch):
    parent = _one_step_recipe(parent_dir, tiny_clip_dir, training={"steps": 2, "batch_size": 1, "base_batch_size": 1, "checkpoint_every": 1})
    _write_yaml(tmp_path / "base" / "parent.yaml", parent)
    _write_yaml(tmp_path / "variant.yaml", {"extends": "base/parent.yaml", "out": str(tmp_path / "joint"), "domains": [{"name": "ghost", "prompt": "a ghost"}]})

    def killed(*args, **kwargs):
        raise RuntimeError("killed while saving")

    with monkeypatch.context() as patch:  # the run dies before its checkpoint is written; its state stays
        patch.setattr(ExpandedGenerator, "save_pretrained", killed)
        with pytest.raises(RuntimeError, match="killed"):
            run("expand", tmp_path / "variant.yaml")
    parent["training"]["lr"] = 0.01  # the variant's file is unchanged; what it extends is not
    _write_yaml(tmp_path / "base" / "parent.yaml", parent)
    refused = run("expand", tmp_path / "variant.yaml", "--resume")
    assert refused.exit_code != 0 and "lr: 0.002 in the state, 0.01 now" in refused.output, refused.output
    del parent["training"]["lr"]
    _write_yaml(tmp_path / "base" / "parent.yaml", parent)
    result = run("expand", tmp_path / "variant.yaml", "--resume")
    assert result.exit_code == 0, result.output
    assert ExpandedGenerator.from_pretrained(tmp_path / "joint").domain_names == ["zombie", "ghost"]


def test_expand_show_prints_a_variant_as_it_would_train_and_writes_nothing(tmp_path, home):
    _write_yaml(tmp_path / "base" / "parent.yaml", {
        "model": "world-portraits", "out": "runs/parent", "training": {"steps": 300},
        "domains": [{"name": "zombie", "prompt": "a portrait of a zombie", "weights": {"lambda_nada": 2.0}}, {"name": "me", "method": "mystyle", "images": "photos/me"}],
    })
    variant = _write_yaml(tmp_path / "variant.yaml", {"extends": "base/parent.yaml", "domains": [{"name": "zombie", "weights": {"lambda_nada_consistency": 0.6}}]})
    result = run("expand", variant, "--seed", "3", "--set", "lambda_gan=0", "--out", tmp_path / "out", "--show")
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.output)
    assert "extends" not in shown and shown["out"] == str(tmp_path / "out")
    assert shown["training"] == {"steps": 300, "lambda_gan": 0, "seed": 3}
    assert shown["domains"][0] == {"name": "zombie", "prompt": "a portrait of a zombie", "weights": {"lambda_nada": 2.0, "lambda_nada_consistency": 0.6}}
    assert shown["domains"][1]["images"] == str((tmp_path / "base" / "photos" / "me").resolve())
    # what is shown is a whole recipe: saved, it trains the same run
    again, expected = Recipe.load(_write_yaml(tmp_path / "shown.yaml", shown)), Recipe.load(variant)
    assert again.domains == expected.domains and again.training == expected.training.with_settings({"seed": 3, "lambda_gan": 0})
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.state").exists()
    refused = run("expand", variant, "--set", "lambda_gan=-1", "--show")
    assert refused.exit_code != 0 and "lambda_gan must be >= 0" in refused.output, refused.output


class _LinearEncoder:
    """A stand-in CLIP: images -> their mean RGB (unnormalised, so directions scale with the change)."""

    def encode_text(self, prompts):
        rows = {"zombie": [1.0, 0.0, 0.0], "ghost": [0.0, 0.0, 1.0]}
        return torch.nn.functional.normalize(torch.tensor([next((v for k, v in rows.items() if k in p), [0.0, 1.0, 0.0]) for p in prompts]), dim=-1)

    def encode_images(self, images):
        return images.mean(dim=(2, 3))


def test_a_prompt_that_embeds_like_the_source_is_refused():
    guidance = ClipGuidance([_LinearEncoder()], templates=("{}",))
    with pytest.raises(ValueError, match="'a person' and the source prompt 'a portrait' embed alike in CLIP"):
        guidance.text_direction(guidance.encoders[0], "a portrait", "a person")  # both the stand-in's green


def test_nada_direction_losses_cosine_is_scale_free_projection_is_not():
    from expander.losses.nada import loss_nada

    base = torch.zeros(2, 3, 4, 4)
    towards = torch.zeros(2, 3, 4, 4)
    towards[:, 0] = 1.0  # exactly along the text direction (red minus green, normalised)
    towards[:, 1] = -1.0
    losses = {}
    for kind in ("cosine", "projection"):
        guidance = ClipGuidance([_LinearEncoder()], templates=("{}",), direction_loss=kind)
        losses[kind] = [loss_nada(guidance, base + scale * towards, base, "a person", "a zombie").item() for scale in (0.01, 1.0)]
    assert losses["cosine"][0] == pytest.approx(0.0, abs=1e-6) and losses["cosine"][1] == pytest.approx(0.0, abs=1e-6)
    assert losses["projection"][0] > losses["projection"][1]  # a bigger move towards the text is rewarded
    with pytest.raises(ValueError, match="direction loss"):
        ClipGuidance([_LinearEncoder()], direction_loss="angle")


def test_exclusive_hinge_penalises_only_what_other_domains_ask_for():
    from expander.losses.nada import loss_nada

    guidance = ClipGuidance([_LinearEncoder()], templates=("{}",), direction_loss="projection")
    base = torch.zeros(2, 3, 4, 4)
    zombie = base.clone()
    zombie[:, 0], zombie[:, 1] = 1.0, -1.0  # along the zombie direction only
    ghostly = zombie.clone()
    ghostly[:, 2] = 1.0  # plus what only "a ghost" asks for
    for images in (zombie, ghostly):
        plain = loss_nada(guidance, images, base, "a person", "a zombie", ["a ghost"], contrast_strength=0.0)
        hinged = loss_nada(guidance, images, base, "a person", "a zombie", ["a ghost"], contrast_strength=0.0, exclusive_weight=2.0)
        if images is zombie:
            assert hinged == pytest.approx(plain.item(), abs=1e-6)
        else:
            exclusive = guidance.exclusive_directions(guidance.encoders[0], "a person", "a zombie", ["a ghost"])  # (1, 3)
            assert exclusive @ guidance._raw_direction(guidance.encoders[0], "a person", "a zombie") == pytest.approx(0.0, abs=1e-6)
            assert hinged.item() == pytest.approx(plain.item() + 2.0 * float(exclusive[0] @ torch.tensor([1.0, -1.0, 1.0])), abs=1e-5)


def test_image_exclusive_hinge_penalises_what_other_domains_draw_beyond_the_own_text():
    from expander.losses.nada import loss_nada_image_exclusive, nada_image_directions

    guidance = ClipGuidance([_LinearEncoder()], templates=("{}",), direction_loss="projection")
    base = torch.zeros(2, 3, 4, 4)
    zombie = base.clone()
    zombie[:, 0], zombie[:, 1] = 1.0, -1.0  # along the zombie text direction only
    drawn_by_other = base.clone()
    drawn_by_other[:, 0], drawn_by_other[:, 1], drawn_by_other[:, 2] = 1.0, -1.0, 1.0  # another domain: zombie-like + its own channel
    others = [nada_image_directions(guidance, drawn_by_other, base)]
    own = nada_image_directions(guidance, zombie, base)
    assert own[0].shape == (2, 3)
    # the other domain's drawing, minus what the zombie text asks for, is channel 2 alone: no penalty for a pure zombie edit
    assert loss_nada_image_exclusive(guidance, own, others, "a person", "a zombie").item() == pytest.approx(0.0, abs=1e-6)
    leaking = zombie.clone().requires_grad_(True)
    with torch.no_grad():
        leaking[:, 2] = 0.5
    loss = loss_nada_image_exclusive(guidance, nada_image_directions(guidance, leaking, base), others, "a person", "a zombie")
    assert loss.item() == pytest.approx(0.5, abs=1e-5)  # the leaked channel's mean, along the unit exclusive direction
    loss.backward()
    assert leaking.grad[:, 2].sum() > 0 and leaking.grad[:, :2].abs().max() == pytest.approx(0.0, abs=1e-7)
    assert loss_nada_image_exclusive(guidance, own, [], "a person", "a zombie").item() == 0.0


def test_composed_edits_are_free_when_edits_add_up_and_cost_half_when_one_is_lost():
    from expander.losses.nada import loss_composed_edits

    # Views on (crops): the four images of a latent must share each view, else adding up would not be free.
    guidance = ClipGuidance([_LinearEncoder()], templates=("{}",), augment_views=4, augment_noise=0.0)
    rng = torch.Generator().manual_seed(0)
    base = torch.rand(2, 3, 8, 8, generator=rng)
    ramp = torch.linspace(0, 1, 8).expand(8, 8)  # spatial structure, so differently cropped views differ
    domain, partner = base.clone(), base.clone()
    domain[:, 0] += ramp  # domain i moves the red channel, partner j the blue one
    partner[:, 2] += ramp.T
    added = (domain + partner - base).requires_grad_(True)
    assert loss_composed_edits(guidance, added, domain, partner, base, rng).item() == pytest.approx(0.0, abs=1e-6)
    only_domain = domain.clone().requires_grad_(True)  # j's edit erased by i's
    loss = loss_composed_edits(guidance, only_domain, domain, partner, base, rng)
    assert 0.3 < loss.item() < 0.7  # ||e_j - e_base||^2 over the sum of both edits (equal sizes up to the crop)
    loss.backward()
    assert only_domain.grad[:, 2].sum() < 0 and only_domain.grad[:, 1].abs().max() == pytest.approx(0.0, abs=1e-7)  # pushes blue up, nothing else
    # With noise too: the four images share it, so edits that add up are still free (the encoder is linear).
    noisy = ClipGuidance([_LinearEncoder()], templates=("{}",), augment_views=4, augment_noise=0.1)
    assert loss_composed_edits(noisy, added, domain, partner, base, rng).item() == pytest.approx(0.0, abs=1e-5)


def test_consistency_keeps_who_resembles_whom_not_what_they_look_like():
    from expander.losses.nada import loss_nada_consistency

    rng = torch.Generator().manual_seed(0)
    views, batch, dim = 2, 5, 8
    base = torch.randn(views * batch, dim, generator=rng)  # (V*B, D), view-major
    rotation = torch.linalg.qr(torch.randn(dim, dim, generator=rng))[0]
    # the same neighbourhoods in another place (a whole-image style moves every sample alike): free
    assert loss_nada_consistency([(base @ rotation, base)], batch).item() == pytest.approx(0.0, abs=1e-5)
    # one template for every latent (what NADA alone converges to): paid for
    template = (torch.randn(1, dim, generator=rng) * 10 + 0.1 * torch.randn(views * batch, dim, generator=rng)).requires_grad_(True)
    loss = loss_nada_consistency([(template, base), (template, base)], batch)
    assert loss.item() > 0.1
    loss.backward()
    assert template.grad.abs().sum() > 0
    # views are ranked separately: each view's rows only compare with the same view's rows
    per_view = [loss_nada_consistency([(template[v * batch : (v + 1) * batch], base[v * batch : (v + 1) * batch])], batch) for v in range(views)]
    assert loss.item() == pytest.approx(sum(p.item() for p in per_view) / views, rel=1e-5)
    # a sharper temperature weighs the nearest neighbours more
    assert loss_nada_consistency([(template, base)], batch, temperature=0.05).item() != pytest.approx(loss.item())
    # fewer than three latents: nothing to rank
    assert loss_nada_consistency([(template[:2], base[:2])], 2).item() == 0.0


def test_a_domain_with_another_domains_prompt_still_has_a_direction():
    """Re-adding an attribute (e.g. at another alpha): contrast with the own prompt would cancel it to 0."""
    guidance = ClipGuidance([_LinearEncoder()], templates=("{}",))
    encoder = guidance.encoders[0]
    plain = guidance.text_direction(encoder, "a person", "a zombie")
    assert torch.allclose(guidance.text_direction(encoder, "a person", "a zombie", ["a zombie"]), plain)
    twice = guidance.text_direction(encoder, "a person", "a zombie", ["a zombie", "a ghost", "a ghost"])
    assert torch.allclose(twice, guidance.text_direction(encoder, "a person", "a zombie", ["a ghost"]))
    dual = guidance.text_direction(encoder, "a person", "a zombie", ["a zombie"], dual_ridge=0.3)
    assert dual.norm() > 0.5
    assert guidance.exclusive_directions(encoder, "a person", "a zombie", ["a zombie"]).shape == (0, plain.shape[-1])


def test_contrast_removes_the_component_shared_by_the_domains():
    guidance = ClipGuidance([_LinearEncoder()], templates=("{}",))
    encoder = guidance.encoders[0]
    plain = guidance.text_direction(encoder, "a person", "a zombie")
    contrasted = guidance.text_direction(encoder, "a person", "a zombie", ["a ghost", "a ghoul"])
    other = guidance.text_direction(encoder, "a person", "a ghost", ["a zombie", "a ghoul"])
    assert torch.allclose(plain.norm(), torch.tensor(1.0)) and torch.allclose(contrasted.norm(), torch.tensor(1.0))
    assert contrasted @ other < plain @ guidance.text_direction(encoder, "a person", "a ghost")  # domains pulled apart
    assert guidance.text_direction(encoder, "a person", "a zombie", ["a ghost", "a ghoul"]) is contrasted  # cached
    # the strength interpolates: 0 is the plain direction, partial centring lies between
    assert torch.allclose(guidance.text_direction(encoder, "a person", "a zombie", ["a ghost", "a ghoul"], 0.0), plain)
    raw = torch.stack([guidance._raw_direction(encoder, "a person", p) for p in ("a zombie", "a ghost", "a ghoul")])
    half = guidance.text_direction(encoder, "a person", "a zombie", ["a ghost", "a ghoul"], 0.5)
    assert torch.allclose(half, torch.nn.functional.normalize(raw[0] - 0.5 * raw.mean(0), dim=-1))


class _FixedTextEncoder(_LinearEncoder):
    """Text directions chosen by the test: "a person" at the origin, every other prompt its own vector."""

    def __init__(self, vectors):
        self.vectors = vectors

    def encode_text(self, prompts):
        return torch.stack([self.vectors.get(p, torch.zeros(3)) for p in prompts])


def test_dual_basis_pays_only_for_what_the_other_domains_do_not_explain():
    from expander.losses.nada import loss_nada

    correlated = {"a zombie": torch.tensor([1.0, 0.0, 0.0]), "a ghost": torch.nn.functional.normalize(torch.tensor([0.8, 0.6, 0.0]), dim=0)}
    guidance = ClipGuidance([_FixedTextEncoder(correlated)], templates=("{}",), direction_loss="projection")
    encoder = guidance.encoders[0]
    raw = torch.stack([guidance._raw_direction(encoder, "a person", p) for p in ("a zombie", "a ghost")])  # (2, 3)
    plain = guidance.text_direction(encoder, "a person", "a zombie")
    assert float(raw[1] @ plain) == pytest.approx(0.8)  # moving exactly like a ghost pays 0.8 of a zombie
    for ridge, leak in ((1e-6, 0.0), (0.1, None)):
        dual = guidance.text_direction(encoder, "a person", "a zombie", ["a ghost"], dual_ridge=ridge)
        assert float(dual @ raw[0]) == pytest.approx(1.0, abs=1e-5)  # its own text direction pays as much as the plain one
        if leak is not None:  # the exact dual basis: another domain's direction pays nothing
            assert float(dual @ raw[1]) == pytest.approx(leak, abs=1e-4)
        else:  # the ridge trades a little of that for a bounded direction
            assert 0 < float(dual @ raw[1]) < 0.8 and dual.norm() < guidance.text_direction(encoder, "a person", "a zombie", ["a ghost"], dual_ridge=1e-6).norm()
    assert guidance.text_direction(encoder, "a person", "a zombie", ["a ghost"], dual_ridge=0.1) is guidance.text_direction(encoder, "a person", "a zombie", ["a ghost"], dual_ridge=0.1)  # cached
    # domains whose directions are orthogonal keep their plain directions
    orthogonal = ClipGuidance([_FixedTextEncoder({"a zombie": torch.tensor([1.0, 0.0, 0.0]), "a ghost": torch.tensor([0.0, 1.0, 0.0])})], templates=("{}",), direction_loss="projection")
    assert torch.allclose(orthogonal.text_direction(orthogonal.encoders[0], "a person", "a zombie", ["a ghost"], dual_ridge=0.1), torch.tensor([1.0, 0.0, 0.0]))
    # in the loss: an image change along the ghost's direction loses its pay for the zombie domain
    base = torch.zeros(2, 3, 4, 4)
    ghostly = base + raw[1][None, :, None, None]  # mean RGB == the ghost's text direction
    assert loss_nada(guidance, ghostly, base, "a person", "a zombie", ["a ghost"], contrast_strength=0.0).item() == pytest.approx(0.2, abs=1e-5)
    assert loss_nada(guidance, ghostly, base, "a person", "a zombie", ["a ghost"], contrast_strength=0.0, dual_ridge=1e-6).item() == pytest.approx(1.0, abs=1e-3)
    # with the cosine loss the dual direction is a unit vector
    cosine = ClipGuidance([_FixedTextEncoder(correlated)], templates=("{}",), direction_loss="cosine")
    assert cosine.text_direction(cosine.encoders[0], "a person", "a zombie", ["a ghost"], dual_ridge=0.1).norm() == pytest.approx(1.0)


def test_an_in_place_add_domain_kept_for_later_trains_longer_exactly(parent_dir, tiny_clip_dir, tmp_path, home):
    import shutil

    mine = tmp_path / "mine"
    shutil.copytree(parent_dir, mine)
    exactly = ("--clip", tiny_clip_dir, "--perceptual", "world", "--device", "cpu")  # seeded networks only, on the CPU
    command = ("add-domain", "a zombie", "--model", mine, *exactly)
    short = run(*command, "--steps", 2, "--keep-state")
    assert short.exit_code == 0 and "the same command plus --resume --steps N" in short.output, short.output
    assert ExpandedGenerator.from_pretrained(mine).domain_names == ["zombie"]  # written over the model it started from
    kept = tmp_path / ".mine.state" / "starting-model"
    refused = run(*command, "--steps", 2)  # a fresh run, refused ('zombie' is taken): the kept copy must survive it
    assert refused.exit_code != 0 and "already has a domain named 'zombie'" in refused.output
    assert ExpandedGenerator.from_pretrained(kept).domain_names == []
    # another --model (same weights) onto this state: the kept copy would be trained, not the model named
    other = run("add-domain", "a zombie", "--model", parent_dir, "--out", mine, *exactly, "--steps", 3, "--resume")
    assert other.exit_code != 0 and f"parent: '{mine.resolve()}' in the state, '{parent_dir.resolve()}' now" in other.output, other.output
    longer = run(*command, "--steps", 3, "--resume")  # starts from the model as it was, not from its own result
    assert longer.exit_code == 0, longer.output
    assert not (tmp_path / ".mine.state").exists()
    refused = run(*command, "--steps", 2, "--keep-state")  # 'zombie' is taken now: refused before any copy is kept
    assert refused.exit_code != 0 and "already has a domain named 'zombie'" in refused.output
    assert not (tmp_path / ".mine.state").exists()
    straight = run("add-domain", "a zombie", "--model", parent_dir, "--out", tmp_path / "straight", *exactly, "--steps", 3)
    assert straight.exit_code == 0, straight.output
    continued, reference = (ExpandedGenerator.from_pretrained(tmp_path / name) for name in ("mine", "straight"))
    assert continued.domain_names == ["zombie"] and continued.get_domain("zombie").steps == 3
    expected = reference.generator.state_dict()
    for key, value in continued.generator.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)


def test_results_are_never_written_into_built_in_or_cached_models_or_onto_a_file(parent_dir, tiny_clip_dir, tmp_path, home, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    snapshot = cache / "models--me--model" / "snapshots" / "abc"
    refused = run("add-domain", "a zombie", "--model", parent_dir, "--out", snapshot, "--steps", 1, "--clip", tiny_clip_dir, *GUIDE)
    assert refused.exit_code != 0 and "built-in or downloaded model" in refused.output, refused.output
    assert not cache.exists()
    (tmp_path / "a.png").write_bytes(b"not a model")
    recipe = {"model": str(parent_dir), "guidance": {"clip": str(tiny_clip_dir)}, "training": {"steps": 1}, "domains": [{"name": "zombie", "prompt": "a zombie"}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    before = sorted(tmp_path.iterdir())
    refused = run("expand", tmp_path / "r.yaml", "--out", tmp_path / "a.png")  # add-domain's --out option refuses a file itself
    assert refused.exit_code != 0 and "it is a file" in refused.output, refused.output
    assert sorted(tmp_path.iterdir()) == before and (tmp_path / "a.png").read_bytes() == b"not a model"


def test_per_domain_settings_are_checked_before_guidance_loads_and_load_errors_name_the_model(parent_dir, tmp_path, home, monkeypatch):
    empty = tmp_path / "no-clip-here"
    empty.mkdir()
    common = ("add-domain", "a zombie", "--model", parent_dir, "--out", tmp_path / "out", "--steps", 1, "--clip", empty, "--perceptual", "world")
    # A stranger in domain_weights is refused first: the unloadable CLIP is never reached.
    refused = run(*common, "--set", "domain_weights={ghost: {lambda_nada: 2.0}}")
    assert refused.exit_code != 0 and "domain_weights names ['ghost']" in refused.output, refused.output
    refused = run(*common)
    assert refused.exit_code != 0 and "could not load the CLIP" in refused.output and "--clip" in refused.output, refused.output
    assert str(empty) in refused.output
    # lpips fetches its backbone from the network: offline, the error names the setting, not only a URL
    import urllib.error

    import expander.guidance.build

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(expander.guidance.build, "load_perceptual", offline)
    refused = run(*common[:-2], "--perceptual", "lpips-alex")
    assert refused.exit_code != 0 and "could not load the perceptual network 'lpips-alex'" in refused.output, refused.output
    assert not (tmp_path / "out").exists()


def test_add_domain_on_a_registered_model_updates_it_only_without_out(parent_dir, tiny_clip_dir, tmp_path, home, offline_lpips):
    from expander.registry import entry_for_model, load_registries, register_user_model

    register_user_model(entry_for_model("tiny", {"path": str(parent_dir)}, ExpandedGenerator.from_pretrained(parent_dir)))
    explicit = run("add-domain", "a zombie", "--model", "tiny", "--out", tmp_path / "elsewhere", "--steps", 1, "--clip", tiny_clip_dir, *GUIDE)
    assert explicit.exit_code == 0, explicit.output
    assert load_registries().models["tiny"].source == {"path": str(parent_dir)}  # --out leaves the name alone
    in_place = run("add-domain", "a sketch", "--model", "tiny", "--steps", 1, "--clip", tiny_clip_dir, *GUIDE)
    assert in_place.exit_code == 0, in_place.output
    entry = load_registries().models["tiny"]
    assert entry.source == {"path": str((home / "models" / "tiny").resolve())}
    assert list(entry.domains) == ["sketch"]
    assert ExpandedGenerator.from_pretrained(parent_dir).domain_names == []  # the original folder is untouched


def test_a_registered_model_kept_for_later_resumes_under_its_name(parent_dir, tiny_clip_dir, tmp_path, home):
    from expander.registry import entry_for_model, register_user_model

    register_user_model(entry_for_model("tiny", {"path": str(parent_dir)}, ExpandedGenerator.from_pretrained(parent_dir)))
    command = ("add-domain", "a zombie", "--model", "tiny", "--clip", tiny_clip_dir, "--perceptual", "world", "--device", "cpu")
    short = run(*command, "--steps", 2, "--keep-state")  # in place: the name now points at $EXPANDER_HOME/models/tiny
    assert short.exit_code == 0, short.output
    longer = run(*command, "--steps", 3, "--resume")  # the same command: the same parent, though its folder moved
    assert longer.exit_code == 0, longer.output
    assert ExpandedGenerator.from_pretrained(home / "models" / "tiny").get_domain("zombie").steps == 3


def test_a_prompt_the_world_teacher_lacks_is_refused_before_a_kept_copy_is_touched(parent_dir, tiny_clip_dir, tmp_path, home):
    import shutil

    mine = tmp_path / "mine"
    shutil.copytree(parent_dir, mine)
    short = run("add-domain", "a zombie", "--model", mine, "--clip", tiny_clip_dir, "--perceptual", "world", "--steps", 1, "--keep-state")
    assert short.exit_code == 0, short.output
    kept = _snapshot(tmp_path / ".mine.state")
    refused = run("add-domain", "a sketchy thing", "--method", "sds", "--diffusion", "world", "--model", mine, "--perceptual", "world", "--steps", 1)
    assert refused.exit_code != 0 and "SDS domain 'sketchy_thing': the world teacher knows no attribute" in refused.output, refused.output
    assert _snapshot(tmp_path / ".mine.state") == kept


def test_augmented_views_are_paired_deterministic_and_reach_the_loss():
    from expander.losses.nada import loss_nada

    guidance = ClipGuidance([_LinearEncoder()], templates=("{}",), direction_loss="projection", augment_views=3, augment_noise=0.1)
    domain, base = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    a_domain, a_base = guidance.augment(domain, base, torch.Generator().manual_seed(0))
    assert a_domain.shape == a_base.shape == (6, 3, 8, 8)
    b_domain, _ = guidance.augment(domain, base, torch.Generator().manual_seed(0))
    assert torch.equal(a_domain, b_domain)  # the trainer's generator makes it reproducible (resume)
    same_d, same_b = guidance.augment(domain, domain, torch.Generator().manual_seed(1))
    assert torch.equal(same_d, same_b)  # one view for both images of a pair: the pair's difference survives
    plain = ClipGuidance([_LinearEncoder()], templates=("{}",), direction_loss="projection")
    assert plain.augment(domain, base) == (domain, base)
    rng = torch.Generator().manual_seed(0)
    assert loss_nada(guidance, domain, base, "a person", "a zombie", rng=rng) != loss_nada(plain, domain, base, "a person", "a zombie")


def test_blurred_views_lose_fine_detail_and_stay_paired():
    guidance = ClipGuidance([_LinearEncoder()], templates=("{}",), augment_views=2, augment_noise=0.0, augment_min_scale=1.0, augment_blur=4.0)
    checkerboard = (torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2 * 2.0 - 1  # (16, 16) finest detail there is
    domain = checkerboard.expand(1, 3, 16, 16).clone()
    views, same = guidance.augment(domain, domain.clone(), torch.Generator().manual_seed(0))
    assert views.shape == (2, 3, 16, 16) and torch.equal(views, same)
    assert views.std() < 0.5 * domain.std()  # the checkerboard is mostly averaged away at a lower resolution
    sharp = ClipGuidance([_LinearEncoder()], templates=("{}",), augment_views=2, augment_noise=0.0, augment_min_scale=1.0)
    assert torch.allclose(sharp.augment(domain, domain, torch.Generator().manual_seed(0))[0], domain.expand(2, -1, -1, -1), atol=1e-5)


def test_projection_cap_stops_pulling_samples_that_went_far_enough():
    from expander.losses.nada import loss_nada

    capped = ClipGuidance([_LinearEncoder()], templates=("{}",), direction_loss="projection", max_projection=0.5)
    base = torch.zeros(2, 3, 4, 4)
    domain = torch.zeros(2, 3, 4, 4)
    domain[0, 0], domain[1, 0] = 2.0, 0.1  # sample 0 is far along the text direction, sample 1 barely moved
    domain.requires_grad_(True)
    loss_nada(capped, domain, base, "a person", "a zombie").backward()
    grad = domain.grad.abs().flatten(1).sum(1)  # (2,)
    assert grad[0] == 0 and grad[1] > 0  # only the sample still short of the cap is pushed
    with pytest.raises(ValueError, match="needs direction_loss='projection'"):
        ClipGuidance([_LinearEncoder()], direction_loss="cosine", max_projection=0.5)


def test_world_clip_names_build_an_ensemble_and_bad_specs_are_refused(monkeypatch, tmp_path):
    from expander.guidance import build as guidance_build
    from expander.hub import load_model
    from expander.world.clip import WORLD_CLIPS

    world = load_model(None)
    present = [name for name, folder in WORLD_CLIPS.items() if (folder / "model.safetensors").exists()]
    guidance = guidance_build.build_guidance(world, ["nada"], {"clip": present, "perceptual": "world"})
    assert len(guidance.clip.encoders) == len(present) and guidance.clip.direction_loss == "projection"
    if len(present) > 1:  # independently trained: the ensemble's members disagree
        a, b = (encoder.encode_text(["a portrait of a zombie"]) for encoder in guidance.clip.encoders[:2])
        assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="mixes world CLIPs"):
        guidance_build.build_guidance(world, ["nada"], {"clip": ["world", "openai/clip-vit-base-patch32"], "perceptual": "world"})
    monkeypatch.setitem(guidance_build.WORLD_CLIPS, "world-b", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="world-b"):
        guidance_build.build_guidance(world, ["nada"], {"clip": ["world", "world-b"], "perceptual": "world"})


def test_inversion_leaves_the_generators_trainable_flags_as_they_were(tiny_generator):
    tiny_generator.style.requires_grad_(False)  # a caller's choice: only the synthesis network trains
    before = {name: p.requires_grad for name, p in tiny_generator.named_parameters()}
    subject = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    w = invert_images(tiny_generator, subject, lambda a, b: (a - b).abs().mean((1, 2, 3)), steps=2, progress=False)
    assert w.shape == (2, tiny_generator.config.style_dim) and not w.requires_grad
    assert {name: p.requires_grad for name, p in tiny_generator.named_parameters()} == before
    assert any(before.values()) and not all(before.values())


def test_add_domain_refuses_photos_for_a_prompt_domain(parent_dir, tmp_path):
    refused = run("add-domain", "a zombie", "--method", "nada", "--images", tmp_path, "--model", parent_dir, "--out", tmp_path / "out")
    assert refused.exit_code != 0 and "--images is for a mystyle domain" in refused.output and not (tmp_path / "out").exists()
