"""Each benchmark script runs end to end at tiny sizes, so none of them can rot."""

import importlib.util
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_throughput_smoke(tmp_path, capsys):
    results = load("throughput").main(["--smoke", "--threads", "1", "--out", str(tmp_path)])
    assert results["sampling"][0]["ours_images_per_s"] > 0
    assert results["sefa_dormancy"]["dormancy_curve_s"] >= 0
    step = results["training_step"]
    parts = {p["part"]: p["seconds"] for p in step["parts"]}
    # Every part the trainer runs was timed, and the parts add up to the step.
    for name in ("synthesis (one batched call)", "replay: frozen parent synthesis", "replay: perceptual distance", "guidance: CLIP (NADA loss)", "backward", "optimizer step"):
        assert parts[name] > 0, name
    assert abs(sum(parts.values()) - step["step_s"]) < 1e-3
    assert (tmp_path / "results.json").exists() and (tmp_path / "throughput.png").stat().st_size > 0
    assert "speedup" in capsys.readouterr().out


def test_clip_shortcuts_smoke(tmp_path, capsys):
    results = load("clip_shortcuts").main(["--smoke", "--threads", "1", "--out", str(tmp_path), "--attributes", "glasses", "crown", "pop_art"])
    rows = {r["attribute"]: r for r in results["rows"]}
    assert set(rows) == {"glasses", "crown"}  # pop art changes the whole image: not a local attribute
    for row in rows.values():
        assert row["classifier_true"] > row["classifier_misplaced"]  # the evaluator checks where the attribute is
        assert row["world_true"] > 0.5 and row["world_ratio"] == row["world_misplaced"] / row["world_true"]
    assert (tmp_path / "results.json").exists() and "misplaced" in capsys.readouterr().out


def test_clip_directions_smoke(tmp_path, capsys):
    results = load("clip_directions").main(["--smoke", "--threads", "1", "--out", str(tmp_path), "--attributes", "glasses", "eyepatch", "freckles", "--ridges", "0.1"])
    modes = results["modes"]
    assert list(modes) == ["plain", "centred", "dual 0.1"]
    for mode in modes.values():
        assert set(mode["worst_leak"]) == {"glasses", "eyepatch", "freckles"}
        assert mode["pay"]["glasses"]["glasses"] > 0.3  # every mode pays for the domain's own attribute
    # the dual basis pays less for another domain's attribute than the plain directions do
    assert modes["dual 0.1"]["off_diagonal_positive_mean"] < modes["plain"]["off_diagonal_positive_mean"]
    assert (tmp_path / "results.json").exists() and "worst leak" in capsys.readouterr().out
    assert load("clip_directions").recipe_attributes()[:2] == ["glasses", "zombie"]


def test_step_cost_smoke(tmp_path, capsys):
    results = load("step_cost").main(["--smoke", "--threads", "1", "--out", str(tmp_path), "--steps", "2", "--warmup", "1"])
    # The compose recipe's step against the same step without its composed-edits loss, two steps each.
    assert results["variant_settings"] == {"lambda_composed_edits": 0}
    assert all(len(v) == 2 and min(v) > 0 for v in results["step_s"].values())
    assert results["ratio_recipe_over_variant"] > 0 and (tmp_path / "results.json").exists()
    assert "recipe / variant" in capsys.readouterr().out


def test_real_size_step_smoke(tmp_path, capsys):
    results = load("real_size_step").main(["--smoke", "--threads", "1", "--device", "cpu", "--out", str(tmp_path)])
    rows = {r["scenario"].split()[0]: r for r in results["rows"]}
    assert set(rows) == {"nada", "sds"}
    assert (rows["nada"]["recipe_steps"], rows["sds"]["recipe_steps"]) == (2000, 1500)  # recipes/ffhq-*.yaml
    for row in rows.values():
        assert 0 < row["min_step_s"] <= row["median_step_s"] and row["steps_timed"] == 2 and row["peak_gpu_gib"] is None
    assert (tmp_path / "results.json").exists() and "real-size expansion step" in capsys.readouterr().out


def test_leak_visibility_smoke(tmp_path, capsys):
    results = load("leak_visibility").main(["--smoke", "--threads", "1", "--out", str(tmp_path), "--render-attributes", "beard"])
    rows = {r["source"]: r for r in results["rows"]}
    assert list(rows) == ["render freckles", "render beard", "tiny random model: beard"]
    target = rows["render freckles"]
    assert target["classifier_target"] > 0.5 and target["world_target"] > 0.3  # the target drawn is seen by both
    assert target["world_target"] == target["world_own"]  # its own direction is the target's
    assert rows["render beard"]["classifier_target"] < 0.5 and rows["render beard"]["world_own"] > 0.3
    assert (tmp_path / "results.json").exists() and "Leaks into freckles" in capsys.readouterr().out


def test_negative_prompts_smoke(tmp_path, capsys):
    results = load("negative_prompts").main(["--smoke", "--threads", "1", "--out", str(tmp_path), "--pairs", "eyepatch:sunglasses", "glasses:sunglasses"])
    rows = {r["attribute"]: r for r in results["rows"]}
    assert set(rows) == {"eyepatch", "glasses"}
    for row in rows.values():
        # the negative prompt's hinge is paid by the look-alike, hardly by the attribute itself
        assert row["world_lookalike_hinge"] > 0.3 > row["world_true_hinge"]
        assert row["world_true_net"] > row["world_lookalike_net"]
    assert (tmp_path / "results.json").exists() and "look-alike" in capsys.readouterr().out
