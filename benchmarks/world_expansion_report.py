"""Tables of benchmarks/world_expansion.sh's results (markdown, for the README and the notes).

    python benchmarks/world_expansion_report.py runs/world-expansion
    python benchmarks/world_expansion_report.py --reports a.json b.json   # rows of docs/results/HISTORY.md's tables

A ``--reports`` row holds, from one ``expander eval`` report: base FD; mean domain success and the
domains >= 90% (those below listed); the worst leak cell (domain -> attribute) and the mean leak, with
the cells > 5%; mean composition over the non-conflicting pairs, its *relative* value (summed share of
composed samples with both attributes over the summed success of each pair's weaker domain: what
composes among what is learned) and the pairs >= 70%; factors kept and diversity.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Optional


def _load(folder: Path, name: str) -> Optional[dict]:
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _seconds(folder: Path, *names: str) -> str:
    """Wall seconds of the commands ``names`` (several: one row made of successive calls), summed."""
    paths = [folder / f"{name}.seconds" for name in names]
    return str(sum(int(path.read_text()) for path in paths)) if all(path.is_file() for path in paths) else "-"


def _below_90(value: float) -> str:
    """A success below 90% in percent, rounded as HISTORY's rows are, but with one decimal, cut (not
    rounded), where rounding would print 90 (0.896 -> 89.6, 0.8999 -> 89.9)."""
    return f"{100 * value:.0f}" if round(100 * value) < 90 else f"{math.floor(1000 * value) / 10:.1f}"


def leak_cells(report: dict) -> list[tuple[float, str, str]]:
    """(rate, domain, column domain) for every leak cell: the domains' rows (not the base row, whose
    cells are false positives) off the diagonal, without the cells of two domains that draw the same
    attribute (one is the other's success), as the report's own mean_leakage counts them."""
    attribute_of = report.get("attribute_of", {})
    return [
        (value, row, column)
        for row, columns in report["leakage"]["matrix"].items() if row != "base"
        for column, value in columns.items()
        if column != row and attribute_of.get(column, column) != attribute_of.get(row, row)
    ]


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def run_table(folder: Path, runs: list[tuple[str, tuple[str, ...], str]]) -> list[str]:
    """One row per (report name, timed command names, label)."""
    lines = [
        "| run | wall s | base FD (parent) | min success | mean success | max leakage | mean composition | mean perceptual | factors kept |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, timed, label in runs:
        report = _load(folder, name)
        if report is None:
            continue
        source, summary = report["source_preservation"], report["summary"]
        success = list(report["domain_success"].values())
        leaks = [value for value, _, _ in leak_cells(report)]
        lines.append(
            f"| {label} | {_seconds(folder, *timed)} | {source['fid']:.1f} ({_fmt(source['parent_fid'])}) | {_fmt(min(success) if success else None)} | "
            f"{_fmt(summary['mean_success'])} | {_fmt(max(leaks) if leaks else None)} | {_fmt(summary['mean_composition'])} | "
            f"{_fmt(summary['mean_perceptual'])} | {_fmt(summary['mean_factors_preserved'])} |"
        )
    return lines


def success_table(folder: Path, name: str) -> list[str]:
    report = _load(folder, name)
    if report is None:
        return []
    matrix, cells = report["leakage"]["matrix"], leak_cells(report)
    lines = ["| domain | success | max leakage into others | base false positive |", "|---|---|---|---|"]
    for domain, success in report["domain_success"].items():
        leaks = [value for value, row, _ in cells if row == domain]
        lines.append(f"| {domain} | {success:.3f} | {_fmt(max(leaks) if leaks else None)} | {matrix['base'][domain]:.3f} |")
    return lines


HISTORY_HEADER = [
    "| run | base FD | domain success (mean; >= 90%) | leakage max / mean (cells > 5%) | composition (relative; pairs >= 70%) | factors kept; diversity |",
    "|---|---|---|---|---|---|",
]


def history_row(report: dict, label: str) -> str:
    """One row of HISTORY.md's tables from an ``expander eval`` report (see the module docstring)."""

    def share(value):  # a summary mean is null when nothing was measured (no domains, no factors)
        return "-" if value is None else f"{100 * value:.1f}%"

    def plain(value):
        return "-" if value is None else f"{value:.2f}"

    success, summary = report["domain_success"], report["summary"]
    below = ", ".join(f"{name.replace('_', ' ')} {_below_90(value)}" for name, value in sorted(success.items(), key=lambda item: item[1]) if value < 0.9)
    cells = leak_cells(report)
    worst = max(cells, default=None)
    worst_text = "-" if worst is None else f"{100 * worst[0]:.0f}% ({worst[1].replace('_', ' ')} -> {worst[2].replace('_', ' ')})"
    pairs = [pair for pair in report["composition"].values() if not pair["conflicting"]]
    learned = sum(min(success[a] for a in pair["domains"]) for pair in pairs)
    relative = sum(pair["both"] for pair in pairs) / learned if learned else None
    composed = f"{share(summary['mean_composition'])} ({'-' if relative is None else f'{relative:.2f}'}; {sum(pair['both'] >= 0.7 for pair in pairs)})" if pairs else "-"
    return (
        f"| {label} | {report['source_preservation']['fid']:.1f} | {share(summary['mean_success'])}; {sum(v >= 0.9 for v in success.values())}{f' ({below})' if below else ''} | "
        f"{worst_text} / {share(summary['mean_leakage'])} ({sum(value > 0.05 for value, _, _ in cells)}) | {composed} | "
        f"{plain(summary['mean_factors_preserved'])}; {plain(summary['mean_diversity'])} |"
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, nargs="?", help="what benchmarks/world_expansion.sh wrote")
    parser.add_argument("--reports", type=Path, nargs="+", default=[], help="`expander eval --out` reports: one HISTORY.md row each")
    args = parser.parse_args(argv)
    if args.reports:
        print("\n".join(HISTORY_HEADER + [history_row(json.loads(path.read_text()), path.stem) for path in args.reports]))
        return
    if args.folder is None:
        parser.error("give the folder benchmarks/world_expansion.sh wrote, or --reports")
    folder = args.folder
    runs = [
        ("nada10", ("nada10",), "10 NADA domains, joint"),
        ("nada10-noreplay", ("nada10-noreplay",), "10 NADA domains, no replay (ablation)"),
        ("add1", ("add1",), "add-domain: glasses"),
        ("add3", ("add2", "add3"), "add-domain: + zombie + hat"),  # the report follows the third call; the row is two calls
        ("sds3", ("sds3",), "3 SDS domains, directional reg. on"),
        ("sds3-nodir", ("sds3-nodir",), "3 SDS domains, directional reg. off"),
        ("mystyle", ("mystyle",), "MyStyle subject"),
    ]
    print("\n".join(run_table(folder, runs)))
    for name in ("nada10", "sds3", "sds3-nodir", "add3"):
        table = success_table(folder, name)
        if table:
            print(f"\n{name}:\n" + "\n".join(table))
    add1, add3 = _load(folder, "add1"), _load(folder, "add3")
    if add1 and add3:
        first = add1["domain_success"]["glasses"]
        print(f"\nadd-domain forgetting: glasses success {first:.3f} after 1 call, {add3['domain_success']['glasses']:.3f} after 3 ({100 * (add3['domain_success']['glasses'] - first):+.1f} points)")
    mystyle = _load(folder, "mystyle") or {}
    for name, data in mystyle.get("subjects", {}).items():  # `expander eval` measures world subjects
        print(
            f"\nMyStyle {name} identity match: domain {data['domain_match']:.3f}, base subspace at the same latents "
            f"{data['base_same_latents_match']:.3f}, random base samples {data['base_match']:.3f}, the subject's photos {data['subject_photos_match']:.3f}"
        )

if __name__ == "__main__":
    main()
