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


def test_list_shows_registered_models_and_flags_a_moved_folder(model_dir, tmp_path, monkeypatch):
    from expander.registry import ModelEntry, register_user_model

    monkeypatch.setenv("EXPANDER_HOME", str(tmp_path / "home"))
    register_user_model(ModelEntry("mine", {"path": model_dir}, description="two domains", domains={"zombie": {"direction": 31}, "glasses": {"direction": 30}}))
    register_user_model(ModelEntry("gone", {"path": str(tmp_path / "deleted")}))
    result = run("list")
    assert result.exit_code == 0, result.output
    lines = {line.split()[0] if not line.startswith("*") else line.split()[1]: line for line in result.output.splitlines()[1:-1]}
    assert lines["world-portraits"].startswith("* "), "the default model is starred"
    assert " 2 " in lines["mine"] and model_dir in lines["mine"] and lines["mine"].endswith("two domains")
    assert "missing" in lines["gone"] and "missing" not in lines["mine"]
    assert str(tmp_path / "home" / "registry.json") in result.output
