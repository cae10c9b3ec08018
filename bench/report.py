"""Render ``bench/results/latest.json`` as the console table and as the README's markdown table.

``python -m bench.report [results.json]`` prints the markdown (machine, then one table, then the
goals); ``python -m bench`` prints the same table as plain text when it finishes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench.common import RESULTS_DIR

LATEST = RESULTS_DIR / "latest.json"
SECTION_TITLES = {
    "serving": "Serving",
    "drift": "Drift at scale",
    "monitoring": "Monitoring power",
    "loop": "Loop latency",
    "dag_parsing": "DAG parsing",
    "ingest": "Ingest",
    "cluster": "Cluster profile scaling",
}
COLUMNS = ("section", "case", "metric", "medops", "baseline", "medops / baseline", "goal", "met")


def ratio_text(row: dict[str, Any]) -> str:
    """``medops / baseline``, with the plain-words reading where lower is better."""
    value = row.get("ratio")
    if value is None:
        return ""
    text = f"{value:.2f}x"
    if row.get("lower_is_better") and value > 0 and abs(value - 1) >= 0.05:
        text += f" ({1 / value:.1f}x better)" if value < 1 else f" ({value:.1f}x worse)"
    return text


def met_text(met: bool | None) -> str:
    return "" if met is None else ("yes" if met else "NO")


def table_rows(results: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, section in results["sections"].items():
        title = SECTION_TITLES.get(name, name)
        if section["status"] != "ok":
            rows.append([title, "", section["status"], section.get("reason", "")[:100], "", "", "", ""])
        for row in section.get("rows", []):
            baseline = row.get("baseline")
            if row.get("baseline_name") and baseline not in (None, ""):
                baseline = f"{baseline} ({row['baseline_name']})"
            rows.append(
                [
                    title,
                    row["case"],
                    row["metric"],
                    str(row["medops"]),
                    "" if baseline is None else str(baseline),
                    ratio_text(row),
                    row.get("goal", ""),
                    met_text(row.get("met")),
                ]
            )
    return rows


def machine_line(results: dict[str, Any]) -> str:
    m = results["machine"]
    load = ", ".join(str(x) for x in m.get("load_average_at_start", []))
    return (
        f"{m['cores']} cores, {m['ram_gib']} GiB RAM, {m['cpu_model']}, {m['os']}, Python {m['python']}"
        f" (load average at start: {load})"
    )


def header_lines(results: dict[str, Any]) -> list[str]:
    mode = "quick (harness check: sizes and durations too small for the figures to mean anything)"
    lines = [
        f"medops benchmarks, {results['finished_at']} at {results['git_sha']}, "
        f"{'quick' if results['quick'] else 'full'} run in {results['seconds']:.0f} s",
        f"Machine: {machine_line(results)}",
    ]
    if results["quick"]:
        lines.append(f"Mode: {mode}")
    return lines


def render_text(results: dict[str, Any]) -> str:
    """The console table: fixed-width columns, one line per figure."""
    rows = [list(COLUMNS), *table_rows(results)]
    widths = [min(max(len(r[i]) for r in rows), 56) for i in range(len(COLUMNS))]
    out = [*header_lines(results), ""]
    for n, row in enumerate(rows):
        out.append("  ".join(cell[:56].ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    out += ["", *goal_lines(results, markdown=False), *note_lines(results, markdown=False)]
    return "\n".join(out)


def goal_lines(results: dict[str, Any], markdown: bool) -> list[str]:
    lines = ["**Goals**", ""] if markdown else ["Goals:"]
    for goal in results.get("goals", []):
        status = {True: "met", False: "NOT MET", None: "not measured"}[goal["met"]]
        title = SECTION_TITLES.get(goal["section"], goal["section"])
        lines.append(f"- {status}: {title}, {goal['name']}: {goal['value']} (goal {goal['target']})")
    return lines


def note_lines(results: dict[str, Any], markdown: bool) -> list[str]:
    notes = [
        f"{SECTION_TITLES.get(name, name)}: {note}"
        for name, section in results["sections"].items()
        for note in section.get("notes", [])
    ]
    if not notes:
        return []
    return (["", "**Notes**", ""] if markdown else ["", "Notes:"]) + [f"- {note}" for note in notes]


def render_markdown(results: dict[str, Any]) -> str:
    """The README table: machine first, one markdown table, then goals and notes."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = [f"_{line}_  " for line in header_lines(results)]
    lines += ["", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in table_rows(results)]
    lines += ["", *goal_lines(results, markdown=True), *note_lines(results, markdown=True)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Render benchmark results as a markdown table.")
    parser.add_argument("results", nargs="?", type=Path, default=LATEST)
    parser.add_argument("--text", action="store_true", help="plain-text table instead of markdown")
    options = parser.parse_args(argv)
    results = json.loads(options.results.read_text())
    print(render_text(results) if options.text else render_markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
