"""The HISTORY.md rows of benchmarks/world_expansion_report.py, on a committed `expander eval` report."""

from pathlib import Path

from .test_paper_smoke import load

REPORT = Path(__file__).resolve().parents[2] / "docs" / "results" / "dec06b" / "blue15-seed1-step2400.json"


def test_history_rows_give_the_derived_columns(capsys):
    load("world_expansion_report").main(["--reports", str(REPORT)])
    header, rule, row = capsys.readouterr().out.strip().splitlines()
    assert header.startswith("| run | base FD |") and rule.startswith("|---|")
    # B15 of docs/results/HISTORY.md: 7 domains >= 90%, 8 leak cells > 5%, relative 0.79 over 44 pairs, 25 of them >= 70%
    assert row == "| blue15-seed1-step2400 | 96.1 | 90.9%; 7 (freckles 76, hat 82, glasses 82) | 90% (blue skin -> freckles) / 2.4% (8) | 67.8% (0.79; 25) | 0.47; 0.71 |"


def test_leak_cells_are_the_domains_rows_without_false_positives_or_twin_attributes(tmp_path, capsys):
    import json

    def report(matrix, attribute_of):
        domains = [row for row in matrix if row != "base"]
        return {
            "source_preservation": {"fid": 95.0, "parent_fid": 97.3},
            "summary": {"mean_success": 1.0, "mean_composition": None, "mean_perceptual": 0.1, "mean_factors_preserved": 0.5},
            "domain_success": {d: matrix[d][d] for d in domains},
            "attribute_of": attribute_of,
            "leakage": {"matrix": matrix},
        }

    # the base row's false positive (8%) is not a leak; glasses_b draws glasses' attribute, so their cells are each other's success
    sds = report({"base": {"hat": 0.08, "sketch": 0.0}, "hat": {"hat": 0.97, "sketch": 0.0}, "sketch": {"hat": 0.01, "sketch": 0.99}}, {"hat": "hat", "sketch": "sketch"})
    twins = report(
        {"base": {"glasses": 0.0, "glasses_b": 0.0, "hat": 0.0}, "glasses": {"glasses": 0.9, "glasses_b": 0.9, "hat": 0.03}, "glasses_b": {"glasses": 0.8, "glasses_b": 0.8, "hat": 0.0}, "hat": {"glasses": 0.0, "glasses_b": 0.0, "hat": 1.0}},
        {"glasses": "glasses", "glasses_b": "glasses", "hat": "hat"},
    )
    (tmp_path / "sds3.json").write_text(json.dumps(sds))
    (tmp_path / "add3.json").write_text(json.dumps(twins))
    for name, seconds in [("sds3", 300), ("add2", 240), ("add3", 311)]:
        (tmp_path / f"{name}.seconds").write_text(f"{seconds}\n")
    module = load("world_expansion_report")
    assert max(value for value, _, _ in module.leak_cells(sds)) == 0.01
    assert sorted(module.leak_cells(twins), reverse=True)[0] == (0.03, "glasses", "hat")
    module.main([str(tmp_path)])
    rows = {line.split(" | ")[0]: line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| ")}
    assert rows["| 3 SDS domains, directional reg. on"][1:2] + rows["| 3 SDS domains, directional reg. on"][5:6] == ["300", "0.010"]
    assert rows["| add-domain: + zombie + hat"][1:2] + rows["| add-domain: + zombie + hat"][5:6] == ["551", "0.030"]  # two calls' wall time


def test_a_success_just_below_90_percent_never_prints_as_90():
    below_90 = load("world_expansion_report")._below_90
    assert (below_90(0.7578), below_90(0.8906), below_90(0.896), below_90(0.8999)) == ("76", "89", "89.6", "89.9")
