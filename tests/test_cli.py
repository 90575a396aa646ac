import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from expander.checkpoint import ExpandedGenerator
from expander.cli import main
from expander.domains import Domain


@pytest.fixture
def model_dir(tmp_path, tiny_generator):
    model = ExpandedGenerator.from_generator(tiny_generator, num_dormant=8, base_model="tiny")
    model.basis.dormancy = torch.linspace(1.0, 0.01, 32)  # a measured-looking curve, so no network is needed
    model.add_domain(Domain("zombie", direction=-1, prompt="a zombie"))
    model.add_domain(Domain("glasses", direction=-1, prompt="a person with glasses"))
    model.save_pretrained(tmp_path / "model")
    return str(tmp_path / "model")


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result


def test_help_lists_every_command_with_an_example():
    result = run("--help")
    assert result.exit_code == 0
    for command in ["sample", "domains", "directions", "traverse", "pull", "push", "info", "list", "import"]:
        assert command in result.output
        sub = run(command, "--help")
        assert sub.exit_code == 0 and "Example:" in sub.output, command


def test_sample_default_model_base(tmp_path):
    out = tmp_path / "x.png"
    result = run("sample", "--domain", "base", "-n", 4, "--out", out)
    assert result.exit_code == 0, result.output
    assert Image.open(out).size[0] > 64


def test_sample_domain_compose_and_strength(model_dir, tmp_path):
    out = tmp_path / "z.png"
    result = run("sample", "--model", model_dir, "--domain", "zombie", "--compose", "glasses", "--strength", 0.5, "-n", 3, "--out", out)
    assert result.exit_code == 0, result.output
    assert out.exists()


def test_unknown_domain_is_a_clear_error(model_dir, tmp_path):
    result = run("sample", "--model", model_dir, "--domain", "zombee", "--out", tmp_path / "z.png")
    assert result.exit_code != 0
    assert "unknown domain 'zombee'" in result.output and "Did you mean 'zombie'" in result.output
    assert not (tmp_path / "z.png").exists()


def test_missing_model_is_a_clear_error(tmp_path):
    result = run("sample", "--model", tmp_path / "nope", "--out", tmp_path / "z.png")
    assert result.exit_code != 0 and "not found" in result.output
    assert not (tmp_path / "z.png").exists()


def test_domains_table(model_dir):
    result = run("domains", "--model", model_dir)
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0].split()[:3] == ["name", "direction", "method"]
    assert any(line.startswith("zombie") and "a zombie" in line for line in lines)


def test_directions_traverse_info(model_dir, tmp_path):
    result = run("directions", "--model", model_dir, "--out", tmp_path / "curve.png")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "curve.png").exists() and "ratio" in result.output
    result = run("traverse", "--model", model_dir, "--domain", "zombie", "--steps", 5, "-n", 2, "--out", tmp_path / "strip.png")
    assert result.exit_code == 0, result.output
    result = run("info", model_dir)
    assert result.exit_code == 0 and "zombie, glasses" in result.output


def test_list_shows_registered_models_and_flags_a_moved_folder(model_dir, tmp_path):
    from expander.registry import ModelEntry, register_user_model, user_registry_path

    register_user_model(ModelEntry("mine", {"path": model_dir}, description="two domains", domains={"zombie": {"direction": 31}, "glasses": {"direction": 30}}))
    register_user_model(ModelEntry("gone", {"path": str(tmp_path / "deleted")}))
    result = run("list")
    assert result.exit_code == 0, result.output
    lines = {line.split()[0] if not line.startswith("*") else line.split()[1]: line for line in result.output.splitlines()[1:-1]}
    assert lines["world-portraits"].startswith("* "), "the default model is starred"
    assert " 2 " in lines["mine"] and model_dir in lines["mine"] and lines["mine"].endswith("two domains")
    assert "missing" in lines["gone"] and "missing" not in lines["mine"]
    assert str(user_registry_path()) in result.output


def test_traverse_of_the_source_domain_says_what_to_traverse(model_dir, tmp_path):
    result = run("traverse", "--model", model_dir, "--domain", "base", "--out", tmp_path / "s.png")
    assert result.exit_code != 0 and "has no direction to traverse" in result.output and "zombie, glasses" in result.output
    assert "Did you mean" not in result.output and not (tmp_path / "s.png").exists()


def test_a_mistyped_folder_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    import expander.hub

    def no_network(**kwargs):
        raise AssertionError("a local path must not reach the Hub")

    monkeypatch.setattr(expander.hub, "snapshot_download", no_network)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    result = run("sample", "--model", "runs/my-modle", "--out", "z.png")
    assert result.exit_code != 0 and "model folder runs/my-modle not found" in result.output


def test_a_hub_failure_is_one_line_that_names_the_repo(tmp_path, monkeypatch):
    import expander.hub

    def refuse(**kwargs):
        raise RuntimeError("401 Client Error: Repository Not Found")

    monkeypatch.setattr(expander.hub, "snapshot_download", refuse)
    monkeypatch.chdir(tmp_path)
    result = run("sample", "--model", "someone/no-such-model", "--out", "z.png")
    assert result.exit_code != 0 and "'someone/no-such-model'" in result.output and "Repository Not Found" in result.output
    assert "Traceback" not in result.output


def test_directions_save_stores_a_measured_curve(model_dir, tmp_path, monkeypatch):
    import expander.guidance.perceptual as perceptual

    monkeypatch.setattr(perceptual, "load_perceptual", lambda name, model=None: lambda a, b: (a - b).pow(2).flatten(1).mean(1))
    before = ExpandedGenerator.from_pretrained(model_dir).basis.dormancy.clone()
    result = run("directions", "--model", model_dir, "--save", "--out", tmp_path / "c.png")
    assert result.exit_code != 0 and "add --recompute" in result.output
    result = run("directions", "--model", model_dir, "--recompute", "--save", "--samples", 2, "--out", tmp_path / "c.png")
    assert result.exit_code == 0, result.output
    stored = ExpandedGenerator.from_pretrained(model_dir)
    assert stored.basis.dormancy.shape == before.shape and not torch.equal(stored.basis.dormancy, before)
    assert stored.domain_names == ["zombie", "glasses"], "saving the curve keeps the domains"


def test_a_dot_slash_folder_is_that_folder_even_when_a_registered_model_has_its_name(model_dir, tmp_path, monkeypatch, tiny_generator):
    import expander.guidance.perceptual as perceptual
    from expander.registry import ModelEntry, register_user_model

    other = ExpandedGenerator.from_generator(tiny_generator, num_dormant=8, base_model="tiny")
    other.save_pretrained(tmp_path / "elsewhere")
    register_user_model(ModelEntry("model", {"path": str(tmp_path / "elsewhere")}))  # same name as the folder
    monkeypatch.chdir(tmp_path)
    result = run("info", "./model")
    assert result.exit_code == 0 and "zombie" in result.output and str(tmp_path / "model") in result.output, result.output
    monkeypatch.setattr(perceptual, "load_perceptual", lambda name, model=None: lambda a, b: (a - b).pow(2).flatten(1).mean(1))
    result = run("directions", "--model", "./model", "--recompute", "--save", "--samples", 2, "--out", "c.png")
    assert result.exit_code == 0, result.output
    assert ExpandedGenerator.from_pretrained(model_dir).domain_names == ["zombie", "glasses"], "the folder keeps its own domains"
    assert ExpandedGenerator.from_pretrained(str(tmp_path / "elsewhere")).domain_names == []


def test_directions_save_from_inside_the_model_folder_fails_before_measuring(model_dir, monkeypatch):
    import expander.subspace.dormancy as dormancy

    monkeypatch.setattr(dormancy, "dormancy_curve", lambda *a, **k: pytest.fail("measured before refusing"))
    monkeypatch.chdir(model_dir)
    result = run("directions", "--model", ".", "--recompute", "--save", "--out", "../c.png")
    assert result.exit_code != 0 and f"run the command from outside that folder, with --model {model_dir}" in result.output


def test_directions_save_never_writes_into_the_built_in_model(tmp_path):
    result = run("directions", "--recompute", "--save", "--out", tmp_path / "c.png")
    assert result.exit_code != 0 and "built-in or downloaded model" in result.output
    assert not (tmp_path / "c.png").exists()


def test_directions_refuses_an_unknown_plot_format_before_measuring(model_dir, tmp_path, monkeypatch):
    import expander.subspace.dormancy as dormancy

    monkeypatch.setattr(dormancy, "dormancy_curve", lambda *a, **k: pytest.fail("measured before the --out check"))
    result = run("directions", "--model", model_dir, "--recompute", "--save", "--out", tmp_path / "curve.xyz")
    assert result.exit_code != 0 and "is not a plot file name" in result.output and ".png" in result.output
    assert not (tmp_path / "curve.xyz").exists()


def test_add_domain_refuses_a_negative_direction_other_than_auto(model_dir, tmp_path):
    result = run("add-domain", "a portrait of a person with a hat", "--model", model_dir, "--direction", -5, "--out", tmp_path / "m")
    assert result.exit_code != 0 and "-5 is not a direction" in result.output and "-1 for the most dormant free one" in result.output
    assert not (tmp_path / "m").exists()


def test_add_domain_never_changes_the_built_in_model():
    from expander.registry import user_registry_path

    result = run("add-domain", "a portrait of a person with glasses", "--steps", 1)
    assert result.exit_code != 0 and "'world-portraits' is the built-in model" in result.output and "--out" in result.output
    assert not user_registry_path().exists()


def test_hub_cache_and_package_folders_are_not_writable(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from expander.registry import PACKAGE_ROOT, is_protected_model_folder

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert is_protected_model_folder(tmp_path / "hub" / "models--org--name" / "snapshots" / ("0" * 40))
    assert is_protected_model_folder(PACKAGE_ROOT / "world" / "weights" / "portraits")
    assert not is_protected_model_folder(tmp_path / "runs" / "mine")


@pytest.mark.parametrize(
    "prompt, name",
    [("a portrait of a person with blue skin", "blue_skin"), ("a portrait of a person wearing a hat", "hat"), ("a pop art portrait of a person", "pop_art"), ("", "domain")],
)
def test_default_domain_names_are_the_world_attribute_names(prompt, name):
    from expander.cli import _slug
    from expander.world.metrics import resolve_attributes

    assert _slug(prompt) == name
    assert resolve_attributes(["blue-skin", "Pop Art", "specs"], {"specs": "glasses"}) == {"blue-skin": "blue_skin", "Pop Art": "pop_art", "specs": "glasses"}


def test_eval_options_are_checked_before_any_sampling(tmp_path):
    result = run("eval", "-n", 1)
    assert result.exit_code == 2 and "-n" in result.output
    result = run("eval", "--attribute", "glasses", "-n", 2, "--classifier-samples", 0)
    assert result.exit_code != 0 and "--attribute needs DOMAIN=ATTRIBUTE" in result.output
    result = run("eval", "--attribute", "specs=glasses", "-n", 2, "--classifier-samples", 0)
    assert result.exit_code != 0 and "does not have" in result.output


def test_eval_writes_its_report(tmp_path):
    out = tmp_path / "reports" / "r.json"
    result = run("eval", "-n", 4, "--classifier-samples", 0, "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["n_samples"] == 4 and "mean_composition" in report["summary"]
    assert [p.name for p in out.parent.iterdir()] == ["r.json"]  # no temporary file left beside it


@pytest.mark.parametrize(
    "args, message",
    [
        (("--domain", "zombie", "--compose", "glasses,zombie"), "both the domain and in compose"),
        (("--domain", "base", "--strength", 0.5), "has none"),
        (("--domain", "zombie", "--strength", "nan"), "must be a number from -100 to 100"),
        (("--domain", "zombie", "--strength", "1e300"), "must be a number from -100 to 100"),  # finite, but NaN images once scaled by alpha
        (("--domain", "zombie", "--seed", 2**64), "Invalid value for '--seed'"),
        (("--domain", "zombie", "--seed", 2**32), "Invalid value for '--seed'"),  # torch would draw seed 0's images
    ],
)
def test_sample_options_that_would_be_ignored_are_refused(model_dir, tmp_path, args, message):
    result = run("sample", "--model", model_dir, *args, "--out", tmp_path / "z.png")
    assert result.exit_code != 0 and message in result.output and not (tmp_path / "z.png").exists()


@pytest.mark.parametrize(
    "args",
    [("world", "build", "--what", "classifier", "--steps", 0), ("world", "build", "--what", "clip", "--steps", -1), ("world", "preview", "-n", 0, "--out", "p.png"), ("sample", "--nrow", 0, "--out", "s.png")],
)
def test_counts_that_make_no_sense_are_refused_by_the_option(args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run(*args)
    assert result.exit_code == 2 and "Invalid value" in result.output and list(tmp_path.iterdir()) == []


def test_world_build_never_exports_an_untrained_part(tmp_path):
    from expander.world.build import build

    for what, steps in [("classifier", -1), ("gan", 0), ("perceptual", True)]:
        with pytest.raises(ValueError, match="positive whole number"):
            build(what, steps=steps, runs=tmp_path)
    result = run("world", "build", "--what", "parent", "--steps", 5, "--runs", tmp_path)
    assert result.exit_code != 0 and "takes no steps" in result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("suffix", [".PKL", ".pickle"])
def test_import_reads_any_spelling_of_a_pickle_name_as_a_pickle(tmp_path, suffix):
    checkpoint = tmp_path / f"ffhq{suffix}"
    checkpoint.write_bytes(b"not a pickle")
    result = run("import", checkpoint, "--allow-pickle", "--out", tmp_path / "out")
    assert result.exit_code != 0 and "could not read it as a pickle" in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_import_refuses_a_shipped_model_folder_and_the_current_folder_before_reading(tmp_path, monkeypatch):
    from expander.registry import PACKAGE_ROOT

    checkpoint = tmp_path / "ffhq.pt"
    checkpoint.write_bytes(b"never read: the output is checked first")
    shipped = PACKAGE_ROOT / "world" / "weights" / "portraits"
    result = run("import", checkpoint, "--out", shipped)
    assert result.exit_code != 0 and "inside a built-in or downloaded model" in result.output, result.output
    monkeypatch.chdir(tmp_path)
    result = run("import", checkpoint, "--out", ".")
    assert result.exit_code != 0 and "it is the current folder" in result.output, result.output
    result = run("import", checkpoint, "--out", tmp_path / "out")  # now it is read: and refused as what it is
    assert result.exit_code != 0 and "is not a readable PyTorch checkpoint" in result.output, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ffhq.pt"]


def test_import_never_replaces_a_model_with_domains_unless_told(model_dir, tmp_path):
    checkpoint = tmp_path / "ffhq.pt"
    checkpoint.write_bytes(b"never read: the output is checked first")
    before = {p.name: p.read_bytes() for p in Path(model_dir).iterdir()}
    result = run("import", checkpoint, "--out", model_dir)
    assert result.exit_code != 0 and "holds another model, with domains ['zombie', 'glasses']" in result.output and "--overwrite" in result.output, result.output
    assert {p.name: p.read_bytes() for p in Path(model_dir).iterdir()} == before
    result = run("import", checkpoint, "--out", model_dir, "--overwrite")  # past the check: the checkpoint is read
    assert result.exit_code != 0 and "is not a readable PyTorch checkpoint" in result.output, result.output


def test_sample_says_which_domains_it_drew(model_dir, tmp_path):
    result = run("sample", "--model", model_dir, "--compose", "zombie", "-n", 1, "--out", tmp_path / "z.png")
    assert result.exit_code == 0 and "wrote 1 images of 'zombie'" in result.output, result.output
    result = run("sample", "--model", model_dir, "--domain", "glasses", "--compose", "zombie", "-n", 1, "--out", tmp_path / "gz.png")
    assert result.exit_code == 0 and "wrote 1 images of 'glasses+zombie'" in result.output, result.output


def test_import_never_replaces_a_folder_of_another_kind(tmp_path):
    foreign = tmp_path / "clip"
    foreign.mkdir()
    (foreign / "config.json").write_text('{"model_type": "clip"}')
    (foreign / "model.safetensors").write_bytes(b"someone else's weights")
    checkpoint = tmp_path / "ffhq.pt"
    checkpoint.write_bytes(b"never read: the output is checked first")
    result = run("import", checkpoint, "--out", foreign)
    assert result.exit_code != 0 and "holds something other than an expander model" in result.output and "--overwrite" in result.output, result.output
    assert (foreign / "model.safetensors").read_bytes() == b"someone else's weights"


def test_eval_refuses_a_domain_given_two_attributes(model_dir):
    result = run("eval", "--model", model_dir, "--attribute", "zombie=zombie", "--attribute", "zombie=fangs")
    assert result.exit_code != 0 and "names domain 'zombie' twice (zombie and fangs)" in result.output, result.output
    result = run("eval", "--model", model_dir, "--attribute", "specs=glases")
    assert result.exit_code != 0 and "'glases' is not a world attribute" in result.output, result.output


def test_eval_report_path_must_be_json(tmp_path):
    result = run("eval", "--out", tmp_path / "report.txt")
    assert result.exit_code == 2 and "end it in .json" in result.output and not (tmp_path / "report.txt").exists()


@pytest.mark.parametrize("command", [("sample", "--domain", "zombie"), ("traverse", "--domain", "zombie"), ("world", "preview"), ("eval", "--grid")])
def test_an_image_path_without_an_image_suffix_is_refused_before_any_work(command, model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [*command, "new-folder/grid.xyz"] if command[-1] == "--grid" else [*command, "--out", "new-folder/grid.xyz"]
    if command[0] in ("sample", "traverse", "eval"):
        args += ["--model", model_dir]
    result = run(*args)
    assert result.exit_code == 2 and "not an image file name" in result.output and ".png" in result.output, result.output
    assert not (tmp_path / "new-folder").exists()


def test_an_image_file_given_as_the_subject_folder_is_named_as_a_file(tmp_path):
    from expander.utils.images import image_files

    photo = tmp_path / "me.png"
    Image.new("RGB", (8, 8)).save(photo)
    with pytest.raises(ValueError, match="is a file, not an image folder"):
        image_files(photo)


def test_an_image_grid_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    from expander.utils.images import save_grid

    grid = tmp_path / "grid.png"
    save_grid(torch.zeros(2, 3, 8, 8), grid)
    kept = grid.read_bytes()

    def stopped_half_way(self, path, *args, **kwargs):
        Path(path).write_bytes(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", stopped_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_grid(torch.ones(2, 3, 8, 8), grid)
    assert grid.read_bytes() == kept and sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"]


def test_sample_to_a_folder_writes_one_png_per_image_as_in_the_grid(model_dir, tmp_path):
    from expander.utils.images import to_uint8

    out = tmp_path / "zombies"
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # a user's file in the folder stays, and so does the folder itself
    inode = out.stat().st_ino
    (out / "zombie+glasses-seed3-000001.png").write_bytes(b"an older image of the same name")
    result = run("sample", "--model", model_dir, "--domain", "zombie", "--compose", "glasses", "-n", 5, "--seed", 3, "--batch-size", 2, "--out", f"{out}/")
    assert result.exit_code == 0, result.output
    names = [f"zombie+glasses-seed3-{i:06d}.png" for i in range(5)]
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, "notes.txt"]) and (out / "notes.txt").read_text() == "mine"
    assert out.stat().st_ino == inode
    expected = to_uint8(ExpandedGenerator.from_pretrained(model_dir).sample("zombie", n=5, seed=3, compose=["glasses"]))
    for name, pixels in zip(names, expected):  # the old file of a name is replaced
        difference = np.abs(np.asarray(Image.open(out / name)).astype(int) - pixels.astype(int))
        assert difference.max() <= 1, name  # batches of 2 against one of 5: float rounding, at most one level

    fewer = run("sample", "--model", model_dir, "--domain", "zombie", "--compose", "glasses", "-n", 3, "--seed", 3, "--out", out)
    assert fewer.exit_code != 0 and "already holds 2 images of this sample past -n 3 (zombie+glasses-seed3-000003.png" in fewer.output, fewer.output
    other = run("sample", "--model", model_dir, "--domain", "zombie", "--strength", 0.5, "--truncation", 0.7, "-n", 2, "--out", tmp_path / "no-suffix")
    assert other.exit_code == 0 and sorted(p.name for p in (tmp_path / "no-suffix").iterdir()) == ["zombie-strength0.5-psi0.7-seed0-000000.png", "zombie-strength0.5-psi0.7-seed0-000001.png"]


def test_a_subjects_images_do_not_depend_on_how_many_are_drawn(model_dir, tmp_path):
    model = ExpandedGenerator.from_pretrained(model_dir)
    model.add_domain(Domain("me", direction=-1, method="mystyle", images="photos/"))
    model.set_anchors("me", model.random_latents(5, seed=7))
    model.save_pretrained(tmp_path / "with-me")
    for n in (2, 4):
        assert run("sample", "--model", tmp_path / "with-me", "--domain", "me", "-n", n, "--out", tmp_path / f"me{n}").exit_code == 0
    for name in ("me-seed0-000000.png", "me-seed0-000001.png"):
        assert (tmp_path / "me2" / name).read_bytes() == (tmp_path / "me4" / name).read_bytes(), name


@pytest.mark.parametrize(
    "out, args, message",
    [("grid.png", ("-n", 1025), "a grid holds at most 1024 images, not 1025; write them to a folder instead (--out grid/)"),
     ("existing-file", (), "not an image file name"),
     ("run.v2", (), "or end it in / for a folder of PNGs (e.g. run.v2/)"),
     (".", (), "it is the current folder"),
     ("zombies/", ("-n", 0), "Invalid value for '-n'"),
     ("zombies/", ("--nrow", 4), "--nrow lays out a grid")],
)
def test_sample_refuses_a_bad_output_before_any_work(model_dir, tmp_path, monkeypatch, out, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "existing-file").write_text("not a folder")
    result = run("sample", "--model", model_dir, "--domain", "zombie", *args, "--out", out)
    assert result.exit_code != 0 and message in result.output, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing-file", "model"]


def test_sample_folder_of_an_unknown_domain_writes_nothing(model_dir, tmp_path):
    result = run("sample", "--model", model_dir, "--domain", "zombee", "-n", 2, "--out", tmp_path / "out/")
    assert result.exit_code != 0 and "unknown domain 'zombee'" in result.output and not (tmp_path / "out").exists()


def test_a_stopped_folder_write_leaves_the_folder_as_it_was(tmp_path):
    from expander.utils.images import save_image_folder

    def batches_then_stop():
        yield torch.zeros(2, 3, 8, 8)
        raise KeyboardInterrupt

    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "a.png").write_bytes(b"old")
    for folder in (tmp_path / "old", tmp_path / "new"):
        with pytest.raises(KeyboardInterrupt):
            save_image_folder(batches_then_stop(), folder, ["a.png", "b.png", "c.png"], progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"] and [p.name for p in (tmp_path / "old").iterdir()] == ["a.png"]
    assert (tmp_path / "old" / "a.png").read_bytes() == b"old"
