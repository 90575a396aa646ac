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
