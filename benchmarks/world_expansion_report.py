"""Tables of benchmarks/world_expansion.sh's results (markdown, for the README and the notes).

    python benchmarks/world_expansion_report.py runs/world-expansion
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional


def _load(folder: Path, name: str) -> Optional[dict]:
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _seconds(folder: Path, name: str) -> str:
    path = folder / f"{name}.seconds"
    return path.read_text().strip() if path.is_file() else "-"


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def run_table(folder: Path, runs: list[tuple[str, str]]) -> list[str]:
    lines = [
        "| run | wall s | base FD (parent) | min success | mean success | max leakage | mean composition | mean perceptual | factors kept |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, label in runs:
        report = _load(folder, name)
        if report is None:
            continue
        source, summary = report["source_preservation"], report["summary"]
        success = list(report["domain_success"].values())
        matrix = report["leakage"]["matrix"]
        leaks = [v for row, cols in matrix.items() for col, v in cols.items() if row != col]
        lines.append(
            f"| {label} | {_seconds(folder, name)} | {source['fid']:.1f} ({_fmt(source['parent_fid'])}) | {_fmt(min(success) if success else None)} | "
            f"{_fmt(summary['mean_success'])} | {_fmt(max(leaks) if leaks else None)} | {_fmt(summary['mean_composition'])} | "
            f"{_fmt(summary['mean_perceptual'])} | {_fmt(summary['mean_factors_preserved'])} |"
        )
    return lines


def success_table(folder: Path, name: str) -> list[str]:
    report = _load(folder, name)
    if report is None:
        return []
    matrix = report["leakage"]["matrix"]
    lines = ["| domain | success | max leakage into others | base false positive |", "|---|---|---|---|"]
    for domain, success in report["domain_success"].items():
        leaks = [v for col, v in matrix[domain].items() if col != domain]
        lines.append(f"| {domain} | {success:.3f} | {_fmt(max(leaks) if leaks else None)} | {matrix['base'][domain]:.3f} |")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    folder = args.folder
    runs = [
        ("nada10", "10 NADA domains, joint"),
        ("nada10-noreplay", "10 NADA domains, no replay (ablation)"),
        ("add1", "add-domain: glasses"),
        ("add3", "add-domain: + zombie + hat"),
        ("sds3", "3 SDS domains, directional reg. on"),
        ("sds3-nodir", "3 SDS domains, directional reg. off"),
        ("mystyle", "MyStyle subject"),
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
