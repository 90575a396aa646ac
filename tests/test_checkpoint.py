import re
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from expander.checkpoint import CheckpointError, ExpandedGenerator
from expander.domains import Domain, UnknownDomainError


@pytest.fixture
def expanded(tiny_generator, tiny_discriminator) -> ExpandedGenerator:
    model = ExpandedGenerator.from_generator(tiny_generator, tiny_discriminator, alpha=3.0, num_dormant=8, base_model="tiny-random")
    model.add_domain(Domain("zombie", direction=-1, method="nada", prompt="a zombie", steps=10))
    model.add_domain(Domain("sketch", direction=-1, method="sds", prompt="a sketch"))
    return model


def test_round_trip_is_exact(expanded, tmp_path):
    expanded.save_pretrained(tmp_path / "m")
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert files == ["README.md", "config.json", "discriminator.safetensors", "domains.json", "model.safetensors", "samples.png"]
    loaded = ExpandedGenerator.from_pretrained(tmp_path / "m")
    for key, value in expanded.weights_dict().items():
        assert torch.equal(value, loaded.weights_dict()[key]), key
    assert [d.to_dict() for d in loaded.domains] == [d.to_dict() for d in expanded.domains]
    assert loaded.alpha == 3.0 and loaded.num_dormant == 8 and loaded.base_model == "tiny-random"
    torch.testing.assert_close(loaded.sample("zombie", n=3, seed=1), expanded.sample("zombie", n=3, seed=1))
    card = (tmp_path / "m" / "README.md").read_text()
    assert "library_name: expander" in card and "| zombie |" in card


def test_rosinality_weights_survive_unchanged(tiny_generator, tmp_path):
    """Original key layout -> strict load -> expanded checkpoint -> back: bit-identical."""
    original = {k: v.clone() for k, v in tiny_generator.state_dict().items()}
    model = ExpandedGenerator.from_generator(tiny_generator)
    model.save_pretrained(tmp_path / "m")
    tensors = load_file(str(tmp_path / "m" / "model.safetensors"))
    restored = {k[len("generator."):]: v for k, v in tensors.items() if k.startswith("generator.")}
    assert restored.keys() == original.keys()
    for key in original:
        assert torch.equal(restored[key], original[key]), key
    assert torch.equal(tensors["latent_avg"], tiny_generator.w_avg)


def test_add_domain_picks_free_dormant_directions_and_refuses_bad_ones(expanded):
    dormant = expanded.dormant_directions()
    assert [d.direction for d in expanded.domains] == dormant[:2]
    with pytest.raises(ValueError, match="already used"):
        expanded.add_domain(Domain("again", direction=dormant[0]))
    with pytest.raises(ValueError, match="not dormant"):
        expanded.add_domain(Domain("loud", direction=0))
    expanded.add_domain(Domain("loud", direction=0), force=True)
    with pytest.raises(IndexError, match="out of range"):
        expanded.add_domain(Domain("far", direction=999))
    with pytest.raises(ValueError, match="already has a domain named"):
        expanded.add_domain(Domain("zombie", direction=-1))
    with pytest.raises(ValueError, match="reserved"):
        expanded.add_domain(Domain("base", direction=-1))


def test_base_samples_ignore_repurposed_coordinates_and_domains_differ(expanded):
    base = expanded.sample("base", n=4, seed=0)
    zombie = expanded.sample("zombie", n=4, seed=0)
    assert base.shape == (4, 3, 16, 16) and not torch.allclose(base, zombie)
    torch.testing.assert_close(expanded.sample("zombie", n=4, seed=0, strength=0.0), base)
    composed = expanded.sample("zombie", n=2, seed=0, compose=["sketch"])
    assert composed.shape == (2, 3, 16, 16)
    assert expanded.traverse("zombie", n=2, steps=5).shape == (2, 5, 3, 16, 16)


@pytest.mark.parametrize("noise_mode", ["const", "random"])
def test_sample_batches_are_the_samples_one_batch_at_a_time(expanded, noise_mode):
    whole = expanded.sample("zombie", n=5, seed=2, compose=["sketch"], noise_mode=noise_mode)
    batches = list(expanded.sample_batches("zombie", n=5, seed=2, compose=["sketch"], noise_mode=noise_mode, batch_size=2))
    assert [len(b) for b in batches] == [2, 2, 1] and not any(b.requires_grad for b in batches)
    torch.testing.assert_close(torch.cat(batches), whole)  # the batch size decides memory, never the images
    torch.testing.assert_close(expanded.sample("zombie", n=3, seed=2, compose=["sketch"], noise_mode=noise_mode), whole[:3])  # -n only says how many


def test_sample_batches_checks_its_arguments_at_the_call(expanded):
    with pytest.raises(UnknownDomainError):
        expanded.sample_batches("zombi")  # not only when the first batch is taken
    with pytest.raises(ValueError, match="noise_mode must be"):
        expanded.sample_batches("zombie", noise_mode="fresh")
    for n, batch_size in ((0, 4), (-1, 4), (4, 0)):
        with pytest.raises(ValueError, match="must be at least 1"):
            expanded.sample_batches("zombie", n=n, batch_size=batch_size)


def test_random_latents_of_many_are_mapped_in_chunks_to_the_same_w(expanded, monkeypatch):
    import expander.checkpoint as checkpoint

    whole = expanded.random_latents(10, seed=4)
    monkeypatch.setattr(checkpoint, "MAPPING_CHUNK", 3)
    torch.testing.assert_close(expanded.random_latents(10, seed=4), whole)


def test_unknown_domain_lists_close_matches(expanded):
    with pytest.raises(UnknownDomainError, match="Did you mean 'zombie'"):
        expanded.sample("zombi")


def _saved(expanded, tmp_path):
    folder = tmp_path / "m"
    expanded.save_pretrained(folder)
    return folder


def test_reserved_directions_are_skipped_by_automatic_picks(expanded):
    free = expanded.free_directions()
    picked = expanded.add_domain(Domain("auto", direction=-1), reserved={free[0]})
    assert picked.direction == free[1]
    expanded.add_domain(Domain("explicit", direction=free[0]))  # still free for the domain that asked for it


def test_anchored_domain_samples_between_its_anchors_and_round_trips(expanded, tmp_path):
    expanded.add_domain(Domain("me", direction=-1, method="mystyle", images="photos/"))
    D = expanded.generator.style_dim
    anchors = expanded.random_latents(5, seed=7)  # (5, D)
    expanded.set_anchors("me", anchors)
    w = expanded.sampling_latents("me", 64, seed=0)  # (64, D)
    # Every sample is a convex combination of at most 3 anchors: least squares recovers weights >= 0 summing to 1.
    weights = torch.linalg.lstsq(anchors.T, w.T).solution.T  # (64, 5)
    assert torch.allclose(weights.sum(dim=1), torch.ones(64), atol=1e-3)
    assert (weights > -1e-3).all() and ((weights > 1e-3).sum(dim=1) <= 3).all()
    assert torch.equal(w, expanded.sampling_latents("me", 64, seed=0))  # seeded
    assert torch.equal(w[:5], expanded.sampling_latents("me", 5, seed=0))  # sample i is the same whatever n
    assert not torch.equal(expanded.sampling_latents("zombie", 4, seed=0)[:1], w[:1])  # others: random latents
    expanded.save_pretrained(tmp_path / "m")
    assert f"anchors.{expanded.get_domain('me').direction}" in load_file(str(tmp_path / "m" / "model.safetensors"))
    loaded = ExpandedGenerator.from_pretrained(tmp_path / "m")
    assert torch.equal(loaded.anchors("me"), anchors) and loaded.anchors("zombie") is None
    torch.testing.assert_close(loaded.sample("me", n=3, seed=2), expanded.sample("me", n=3, seed=2))
    with pytest.raises(ValueError, match="must have shape"):
        expanded.set_anchors("me", torch.zeros(3, D + 1))
    with pytest.raises(ValueError, match="NaN"):
        expanded.set_anchors("me", torch.full((2, D), float("nan")))


def test_a_composed_subject_is_drawn_whichever_domain_lists_it(expanded):
    expanded.add_domain(Domain("me", direction=-1, method="mystyle", images="photos/"))
    expanded.add_domain(Domain("you", direction=-1, method="mystyle", images="others/"))
    expanded.set_anchors("me", expanded.random_latents(5, seed=7))
    # zombie on me and me on zombie are one image: both start from my latents
    torch.testing.assert_close(expanded.sample("zombie", n=3, seed=1, compose=["me"]), expanded.sample("me", n=3, seed=1, compose=["zombie"]))
    assert not torch.allclose(expanded.sample("zombie", n=3, seed=1, compose=["me"]), expanded.sample("zombie", n=3, seed=1, compose=["sketch"]))
    expanded.set_anchors("you", expanded.random_latents(4, seed=8))
    with pytest.raises(ValueError, match=re.escape("domains ['me', 'you'] are each one subject")):
        expanded.sample("me", n=1, compose=["you"])


def test_strengths_far_past_the_domain_are_refused(expanded):
    for strength in (1e300, -101.0, float("inf")):
        with pytest.raises(ValueError, match="must be a number from -100 to 100"):
            expanded.sample("zombie", n=1, strength=strength)
    with pytest.raises(ValueError, match="max_strength"):
        expanded.traverse("zombie", n=1, max_strength=1e30)
    assert torch.isfinite(expanded.sample("zombie", n=1, strength=-100.0)).all()


def test_anchors_of_no_domain_are_refused(expanded, tmp_path):
    folder = _saved(expanded, tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["anchors.0"] = torch.zeros(2, expanded.generator.style_dim)  # direction 0 belongs to no domain
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="anchors 'anchors.0' for no domain"):
        ExpandedGenerator.from_pretrained(folder)


def test_corrupt_weights_are_reported(expanded, tmp_path):
    folder = _saved(expanded, tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        ExpandedGenerator.from_pretrained(folder)


def test_missing_and_unexpected_keys_are_named(expanded, tmp_path):
    folder = _saved(expanded, tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors.pop("generator.conv1.conv.weight")
    tensors["generator.bogus"] = torch.zeros(1)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing keys: generator.conv1.conv.weight; unexpected keys: generator.bogus\. The weights come from another model"):
        ExpandedGenerator.from_pretrained(folder)


def test_another_models_weights_are_summed_up_in_a_short_message(expanded, tmp_path):
    """A weights file of another size names a few mismatches with a count, not every tensor."""
    from expander.generators.stylegan2 import Generator

    from .conftest import tiny_config

    folder = _saved(expanded, tmp_path)
    config = tiny_config()
    config.channels = {size: 2 * count for size, count in config.channels.items()}
    other = ExpandedGenerator.from_generator(Generator(config), alpha=3.0, num_dormant=8)
    save_file(other.weights_dict(), str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"shape mismatches: .*, \.\.\. \(\d+ more\)\. The weights come from another model") as error:
        ExpandedGenerator.from_pretrained(folder)
    assert len(str(error.value)) < 600, str(error.value)


def test_registry_with_duplicate_direction_is_refused(expanded, tmp_path):
    folder = _saved(expanded, tmp_path)
    registry = json.loads((folder / "domains.json").read_text())
    registry["domains"][1]["direction"] = registry["domains"][0]["direction"]
    (folder / "domains.json").write_text(json.dumps(registry))
    with pytest.raises(CheckpointError, match="both use direction"):
        ExpandedGenerator.from_pretrained(folder)


def test_registry_with_out_of_range_direction_is_refused(expanded, tmp_path):
    folder = _saved(expanded, tmp_path)
    registry = json.loads((folder / "domains.json").read_text())
    registry["domains"][0]["direction"] = 32
    (folder / "domains.json").write_text(json.dumps(registry))
    with pytest.raises(CheckpointError, match="out of range 0..31"):
        ExpandedGenerator.from_pretrained(folder)


def test_wrong_format_and_missing_folder(tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"hidden_size": 3}))
    with pytest.raises(CheckpointError, match="not an expander checkpoint"):
        ExpandedGenerator.from_pretrained(tmp_path / "other")
    with pytest.raises(FileNotFoundError, match="not an expander model: it has no config.json.*expander import"):
        ExpandedGenerator.load_folder(tmp_path)


def test_failed_save_leaves_previous_checkpoint_intact(expanded, tmp_path, monkeypatch):
    folder = _saved(expanded, tmp_path)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    expanded.add_domain(Domain("third", direction=-1))

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("expander.checkpoint.save_file", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        expanded.save_pretrained(folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary folder left behind


def test_saving_over_a_model_keeps_files_that_are_not_the_checkpoints(expanded, tmp_path):
    folder = _saved(expanded, tmp_path)
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (folder / "notes.txt").write_text("trained on the lab machine")
    expanded.add_domain(Domain("third", direction=-1))
    expanded.save_pretrained(folder)
    assert (folder / ".git" / "HEAD").read_text() == "ref: refs/heads/main\n"
    assert (folder / "notes.txt").read_text() == "trained on the lab machine"
    assert "third" in ExpandedGenerator.from_pretrained(folder).domain_names
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_failed_folder_swap_puts_the_old_folder_and_its_other_files_back(expanded, tmp_path, monkeypatch):
    import os

    folder = _saved(expanded, tmp_path)
    (folder / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    real_replace = os.replace

    def replace(src, dst):
        if str(dst) == str(folder) and ".old" not in str(src):  # the new folder moving into place
            raise OSError("device busy")
        return real_replace(src, dst)

    monkeypatch.setattr("expander.utils.io.os.replace", replace)
    with pytest.raises(OSError, match="device busy"):
        expanded.save_pretrained(folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_saving_onto_the_current_folder_is_refused(expanded, tmp_path, monkeypatch):
    folder = _saved(expanded, tmp_path)
    monkeypatch.chdir(folder)
    with pytest.raises(ValueError, match="current folder"):
        expanded.save_pretrained(".")
    monkeypatch.chdir(tmp_path)
    expanded.save_pretrained("m/../m")  # resolved first: the folder itself, not a '..' entry
    assert ExpandedGenerator.from_pretrained(folder).domain_names == expanded.domain_names


def test_malformed_config_and_domains_files_are_checkpoint_errors(expanded, tmp_path):
    folder = _saved(expanded, tmp_path)
    domains = (folder / "domains.json").read_text()
    (folder / "domains.json").write_text(json.dumps({"domains": ["zombie"]}))
    with pytest.raises(CheckpointError, match="invalid domains registry"):
        ExpandedGenerator.from_pretrained(folder)
    for layout in ([1, 2], {"domain": []}):
        (folder / "domains.json").write_text(json.dumps(layout))
        with pytest.raises(CheckpointError, match='expected {"domains": \\[...\\]}'):
            ExpandedGenerator.from_pretrained(folder)
    (folder / "domains.json").write_text(domains)
    config = (folder / "config.json").read_text()
    (folder / "config.json").write_text("[]")
    with pytest.raises(CheckpointError, match="expected a JSON object"):
        ExpandedGenerator.from_pretrained(folder)
    (folder / "config.json").write_bytes(b"\xfd\x00binary")  # not text at all: the file is named, not a UnicodeDecodeError
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        ExpandedGenerator.from_pretrained(folder)
    (folder / "config.json").write_text(config)
    ExpandedGenerator.from_pretrained(folder)  # restored: loads again


@pytest.mark.parametrize("name", ["./nope", "runs/nope", "/tmp/expander-no-such-model"])
def test_from_pretrained_reports_a_missing_local_folder_without_asking_the_hub(name, tmp_path, monkeypatch):
    from expander import hub

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    monkeypatch.setattr(hub, "snapshot_download", lambda **kwargs: pytest.fail(f"asked the Hub for {kwargs}"))
    with pytest.raises(hub.ModelNotFoundError, match="not found"):
        ExpandedGenerator.from_pretrained(name)


def test_training_log_round_trips_and_reaches_the_model_card(expanded, tmp_path):
    from expander.expansion import training_run_record
    from expander.train import ExpansionConfig

    config = ExpansionConfig(steps=7, seed=3, lambda_nada_consistency=1.0, domain_weights={"zombie": {"lambda_nada_consistency": 0.3}})
    expanded.record_training(training_run_record(config, ["zombie"], [], {"clip": ["world"], "perceptual": "auto"}))
    expanded.record_training(training_run_record(ExpansionConfig(steps=2), ["sketch"], ["zombie"], None))
    expanded.save_pretrained(tmp_path / "m")
    log = json.loads((tmp_path / "m" / "training.json").read_text())
    assert log["format"] == "expander.training_log" and [r["trained"] for r in log["runs"]] == [["zombie"], ["sketch"]]
    assert log["runs"][0]["settings"]["domain_weights"] == {"zombie": {"lambda_nada_consistency": 0.3}}
    loaded = ExpandedGenerator.from_pretrained(tmp_path / "m")
    assert loaded.training_log == expanded.training_log == log["runs"]
    card = (tmp_path / "m" / "README.md").read_text()
    assert "- Run 1 (" in card and "trained zombie for 7 steps (seed 3)" in card and "`lambda_nada_consistency=1.0`" in card
    assert "per-domain loss weights: zombie `lambda_nada_consistency=0.3`" in card
    assert "- Run 2 (" in card and "trained sketch for 2 steps (seed 0), replaying zombie" in card and "settings changed from the defaults: none" in card
    # training_log hands out copies: editing one does not rewrite the model's history.
    loaded.training_log[0]["trained"].append("x")
    assert loaded.training_log[0]["trained"] == ["zombie"]


def test_training_log_refuses_unknown_domains_and_loads_only_well_formed_files(expanded, tmp_path):
    with pytest.raises(ValueError, match=r"trained \['ghost'\], which are not domains of the model"):
        expanded.record_training({"trained": ["ghost"]})
    with pytest.raises(ValueError, match="JSON-serialisable"):
        expanded.record_training({"trained": ["zombie"], "when": object()})
    assert expanded.training_log == []
    expanded.save_pretrained(tmp_path / "m")
    assert not (tmp_path / "m" / "training.json").exists(), "no runs, no file (parents, older checkpoints)"
    for text, message in [("{not json", "not valid JSON"), ('{"runs": []}', "expected"), ('{"format": "expander.training_log", "runs": [{"steps": 3}]}', "'trained'")]:
        (tmp_path / "m" / "training.json").write_text(text)
        with pytest.raises(CheckpointError, match=message) as caught:
            ExpandedGenerator.from_pretrained(tmp_path / "m")
        assert "delete it to load the model" in str(caught.value)


def test_saved_files_are_as_readable_as_any_file_the_user_writes(expanded, tmp_path):
    import os
    import stat

    mask = os.umask(0o022)
    try:
        expanded.save_pretrained(tmp_path / "shared")
    finally:
        os.umask(mask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "shared").iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o644}, modes  # safetensors alone writes 0600


@pytest.mark.parametrize("key, value, message", [
    ("latent_avg", torch.tensor([5.0]), "shape mismatches: latent_avg (file (1,), model (32,))"),  # copy_ would broadcast it over the mean w
    ("basis.dormancy", torch.zeros(3, 5), "dormancy curve"),  # would silently fall back to singular-value order
    ("basis.directions", torch.full((32, 32), float("nan")), "'basis.directions' holds NaN values"),
    ("basis.directions", 2 * torch.eye(32), "not orthonormal"),
    ("generator.conv1.conv.weight", None, "holds NaN values"),  # None: that tensor with one NaN
    ("generator.conv1.conv.weight", "int32", "holds a int32 tensor, not floating point"),  # a load would cast it silently
])
def test_tensor_values_a_key_check_lets_through_are_refused(expanded, tmp_path, key, value, message):
    folder = _saved(expanded, tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    if value is None:
        value = tensors[key].clone()
        value.view(-1)[0] = float("nan")
    elif isinstance(value, str):  # a dtype name: that tensor stored as it
        value = tensors[key].round().to(getattr(torch, value))
    tensors[key] = value
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=re.escape(message)):
        ExpandedGenerator.from_pretrained(folder)


def test_a_discriminator_with_nan_weights_is_refused(expanded, tmp_path):
    # Training would go on from a NaN discriminator and every GAN loss would be NaN.
    folder = _saved(expanded, tmp_path)
    tensors = load_file(str(folder / "discriminator.safetensors"))
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].clone().fill_(float("inf"))
    save_file(tensors, str(folder / "discriminator.safetensors"))
    with pytest.raises(CheckpointError, match=re.escape(f"discriminator.safetensors: tensor {key!r} holds infinite values")):
        ExpandedGenerator.from_pretrained(folder)


@pytest.mark.parametrize("change, message", [
    ({"alpha": -2}, "alpha must be a positive finite number"),
    ({"alpha": float("nan")}, "alpha must be a positive finite number"),
    ({"format_version": None}, "format_version must be a positive integer"),
    ({"num_dormant": None}, "missing keys ['num_dormant']"),
    ({"num_dormat": 8}, "unknown keys ['num_dormat']"),
    ({"has_discriminator": None}, "missing keys ['has_discriminator']"),
    ({"has_discriminator": "yes"}, "has_discriminator must be true or false"),
    ({"num_dormant": 2.5}, "num_dormant must be an integer"),
])
def test_config_json_is_read_strictly(expanded, tmp_path, change, message):
    folder = _saved(expanded, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    for key, value in change.items():
        if value is None and key != "format_version":
            config.pop(key)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=re.escape(message)):
        ExpandedGenerator.from_pretrained(folder)


def test_a_training_log_the_model_card_cannot_read_is_refused_on_load(expanded, tmp_path):
    folder = _saved(expanded, tmp_path)
    (folder / "training.json").write_text(json.dumps({"format": "expander.training_log", "runs": [{"trained": ["zombie"], "date": 5, "settings": []}]}))
    with pytest.raises(CheckpointError, match=re.escape("date (int, expected str), settings (list, expected dict)")):
        ExpandedGenerator.from_pretrained(folder)
    with pytest.raises(ValueError, match="wrong type"):
        expanded.record_training({"trained": ["zombie"], "guidance": "world"})


def test_a_training_log_whose_per_domain_weights_the_model_card_cannot_read_is_refused_on_load(expanded, tmp_path):
    folder = _saved(expanded, tmp_path)
    (folder / "training.json").write_text(json.dumps({"format": "expander.training_log", "runs": [{"trained": ["zombie"], "settings": {"domain_weights": {"zombie": 5}}}]}))
    with pytest.raises(CheckpointError, match=re.escape("settings.domain_weights must map domain names to {loss weight: value}")):
        ExpandedGenerator.from_pretrained(folder)


@pytest.mark.parametrize(
    "generator, message",
    [
        ({"channels": {str(2**i): 0 for i in range(2, 5)}}, "channels widths must be from 1 to 4096"),
        ({"style_dim": 100000}, "style_dim must be at most 4096"),
        ({"blur_kernel": [0, 0]}, "blur_kernel must be non-negative integers with a positive sum"),
    ],
)
def test_generator_configs_no_stylegan2_has_are_refused_before_anything_is_allocated(expanded, tmp_path, generator, message):
    folder = _saved(expanded, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["generator"].update(generator)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=re.escape(message)):
        ExpandedGenerator.from_pretrained(folder)


def test_saving_through_a_symlink_writes_into_the_folder_it_names(expanded, tmp_path):
    expanded.save_pretrained(tmp_path / "v3")
    (tmp_path / "v3" / "notes.txt").write_text("mine")
    (tmp_path / "latest").symlink_to("v3")
    expanded.save_pretrained(tmp_path / "latest")
    assert (tmp_path / "latest").is_symlink() and (tmp_path / "v3" / "notes.txt").read_text() == "mine"
    assert ExpandedGenerator.from_pretrained(tmp_path / "v3").domain_names == expanded.domain_names


def test_a_training_log_with_null_fields_loads_and_reads_as_not_recorded(expanded, tmp_path):
    from click.testing import CliRunner

    from expander.cli import main

    folder = _saved(expanded, tmp_path)
    (folder / "training.json").write_text(json.dumps({"format": "expander.training_log", "runs": [{"trained": ["zombie"], "date": None, "expander_version": None, "settings": None}]}))
    loaded = ExpandedGenerator.from_pretrained(folder)
    loaded.save_pretrained(folder)  # writes the model card from the log
    assert "Run 1 (?, expander ?)" in (folder / "README.md").read_text()
    result = CliRunner().invoke(main, ["info", str(folder)])
    assert result.exit_code == 0, result.output
    assert "last ?: 1 domains" in result.output


def test_from_pretrained_refuses_unknown_arguments_and_casts_to_torch_dtype(expanded, tmp_path):
    folder = _saved(expanded, tmp_path)
    with pytest.raises(TypeError, match=r"unknown arguments \['map_locaton', 'strict'\]"):
        ExpandedGenerator.from_pretrained(folder, strict=False, map_locaton="cuda")
    with pytest.raises(TypeError, match="floating-point torch.dtype"):
        ExpandedGenerator.from_pretrained(folder, torch_dtype="float16")
    doubled = ExpandedGenerator.from_pretrained(folder, torch_dtype=torch.float64)
    images = doubled.sample("zombie", n=2, seed=3)  # latents follow the model's dtype
    assert images.dtype == torch.float64
    torch.testing.assert_close(images.float(), expanded.sample("zombie", n=2, seed=3), atol=1e-4, rtol=1e-4)


def test_random_noise_is_drawn_from_the_seed(expanded):
    from expander.generators.stylegan2 import NoiseInjection

    for module in expanded.modules():
        if isinstance(module, NoiseInjection):
            module.weight.data.fill_(0.5)  # a random generator starts with the noise off
    first, again = expanded.sample("zombie", n=3, seed=4, noise_mode="random"), expanded.sample("zombie", n=3, seed=4, noise_mode="random", batch_size=2)
    torch.testing.assert_close(first, again)  # the same images, whatever the batches
    assert not torch.allclose(first, expanded.sample("zombie", n=3, seed=4))  # const noise is another picture


@pytest.mark.parametrize("change, message", [
    ({"name": "glasses\n"}, "invalid domain name"),
    ({"prompt": ["a zombie"]}, "prompt must be a text"),
    ({"steps": -1}, "steps must be a whole number"),
    ({"created": 2026}, "created must be a date text"),
])
def test_domain_entries_of_the_wrong_type_are_refused(expanded, change, message):
    entry = {**expanded.domains[0].to_dict(), **change}
    with pytest.raises(ValueError, match=re.escape(message)):
        expanded.set_domains([Domain.from_dict(entry)])


def test_a_bfloat16_model_saves_a_basis_that_loads(expanded, tmp_path):
    expanded.to(torch.bfloat16).save_pretrained(tmp_path / "m")  # rounded to bf16 the basis is off orthonormal by ~3e-3
    loaded = ExpandedGenerator.from_pretrained(tmp_path / "m", torch_dtype=torch.bfloat16)
    assert loaded.basis.directions.dtype == torch.bfloat16
    assert loaded.sample("zombie", n=1).dtype == torch.bfloat16
