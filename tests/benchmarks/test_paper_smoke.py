"""The paper benchmarks run end to end in --smoke mode (tiny random generator, a few steps), so none can rot.

Each writes results.json (finite numbers where numbers are promised) and its PNG plots.
"""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def run(name: str, tmp_path: Path, *extra: str) -> dict:
    results = load(name).main(["--smoke", "--threads", "1", "--out", str(tmp_path), *extra])
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["benchmark"] == name and on_disk["environment"]["smoke"] is True
    assert json.loads(json.dumps(results, default=str))["benchmark"] == name
    return on_disk


def test_expansion_vs_adaptation_smoke(tmp_path, capsys):
    results = run("expansion_vs_adaptation", tmp_path)
    assert [r["n_domains"] for r in results["rows"]] == [1, 2]
    for row in results["rows"]:
        for key in ("time_ratio", "bytes_ratio"):
            assert finite(row[key]) and row[key] > 0, key
        for side in ("expansion", "adaptation"):
            for key in ("seconds", "bytes", "mean_success", "mean_domain_fid"):
                assert finite(row[side][key]), (side, key)
        assert finite(row["expansion"]["base_fid"]) and finite(row["adaptation"]["mean_base_fid"])
        # one checkpoint for N domains vs N generators: N=2 adaptations store twice the generator
    assert results["rows"][1]["adaptation"]["bytes"] == 2 * results["rows"][0]["adaptation"]["bytes"]
    assert results["rows"][1]["expansion"]["bytes"] < results["rows"][1]["adaptation"]["bytes"]
    assert set(results["adapted"]) == {"glasses", "zombie"}
    assert all(finite(a["success"]) and finite(a["base_fid"]) for a in results["adapted"].values())
    assert {"time_bytes.png", "quality.png"} <= {p.name for p in tmp_path.iterdir()}
    assert "| N |" in capsys.readouterr().out


def test_scaling_smoke(tmp_path, capsys):
    results = run("scaling", tmp_path)
    assert [r["n_domains"] for r in results["rows"]] == [1, 3]
    for row in results["rows"]:
        assert finite(row["seconds_per_step"]) and row["seconds_per_step"] > 0
        assert row["steps_run"] >= 1 and row["curve"][0]["step"] == 0
        assert all(finite(p["mean_success"]) and 0 <= p["mean_success"] <= 1 for p in row["curve"])
        assert row["steps_to_target"] is None or finite(row["steps_to_target"])
        assert finite(row["final_report"]["base_fid"])
    assert len(results["rows"][1]["curve"][-1]["success"]) == 3
    assert {"success_curves.png", "scaling.png"} <= {p.name for p in tmp_path.iterdir()}
    assert "steps to mean" in capsys.readouterr().out


def test_class_conditional_smoke(tmp_path, capsys):
    results = run("class_conditional", tmp_path)
    assert set(results["methods"]) == {"ours", "z-concat", "w-offset"}
    for method, r in results["methods"].items():
        assert finite(r["seconds"])
        for key in ("mean_success", "mean_leakage", "mean_perceptual", "mean_factors_preserved", "base_fid", "parent_fid"):
            assert finite(r["summary"][key]), (method, key)
        assert set(r["domain_success"]) == {"hat", "beard"}
        assert set(r["leakage"]["matrix"]) == {"base", "hat", "beard"}
        assert "hat+beard" in r["composition"]
    assert {"metrics.png", "leakage.png"} <= {p.name for p in tmp_path.iterdir()}
    assert "z-concat" in capsys.readouterr().out


def test_paper_figures_smoke(tmp_path, capsys):
    results = run("paper_figures", tmp_path)
    figures = results["figures"]
    assert set(figures) == {"dormancy", "joint", "composition", "alpha", "direction"}
    d = figures["dormancy"]
    assert len(d["curve"]) == len(d["singular_values"]) == 32 and all(finite(v) for v in d["curve"])
    assert finite(d["dormant_to_active_ratio"])
    runs = figures["joint"]["runs"]
    assert set(runs) == {"0", "2"} and all(finite(p["success"]) for r in runs.values() for p in r["curve"])
    assert finite(runs["2"]["curve"][-1]["companion_rate"])
    c = figures["composition"]
    assert c["model"].startswith("joint model")
    for curve in (c["ours"], c["nada_interpolation"]):
        assert len(curve) == 3 and all(finite(p[k]) for p in curve for k in ("first", "second", "both"))
    for name in ("alpha", "direction"):
        for key, r in figures[name]["runs"].items():
            for field in ("success", "base_fid", "domain_fid", "perceptual", "alpha"):
                assert finite(r[field]), (name, key, field)
    assert [r["multiplier"] for r in figures["alpha"]["runs"].values()] == [0.5, 1.0]
    assert [r["dormant"] for r in figures["direction"]["runs"].values()] == [True, True, True, False]
    pngs = {p.name for p in tmp_path.iterdir()}
    assert {"fig12_dormancy.png", "fig7a_joint.png", "fig9_composition.png", "fig17_alpha.png", "fig14_direction.png"} <= pngs
    assert "Fig. 14" in capsys.readouterr().out


def test_prompts_are_in_the_world_clip_vocabulary():
    """Every benchmark prompt (and paraphrase, for N > 17) uses only words the world CLIP knows."""
    from expander.world.clip import WORLD_CLIP_DIR, check_vocabulary

    transformers = pytest.importorskip("transformers")
    sys.path.insert(0, str(BENCHMARKS))
    import common

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(WORLD_CLIP_DIR))
    specs = common.domain_specs(40)
    assert len({s.name for s in specs}) == 40
    for spec in specs:
        assert not check_vocabulary(tokenizer, spec.prompt), spec
        assert spec.attribute in common.PROMPTS
