"""Where the time goes when medops misses a goal: pyinstrument sessions summarised as hot spots.

A hot spot is a function with its file and line, the share of the profiled time spent in it and
below it (inclusive), and the share spent in its own code (self). Inclusive shares name the
medops function to change; self shares show the library call that actually burns the time.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.common import REPO_ROOT, RESULTS_DIR

PROFILES_DIR = RESULTS_DIR / "profiles"


def _walk(frame: Any, stack: tuple[str, ...], inclusive: dict, own: dict, seen_stack: set) -> None:
    key = f"{frame.function} ({_where(frame)})"
    if not frame.is_synthetic:
        if key not in stack:  # recursion: count a function once per stack
            inclusive[key] += frame.time
        own[key] += frame.total_self_time
        stack = (*stack, key)
    for child in frame.children:
        _walk(child, stack, inclusive, own, seen_stack)


def _where(frame: Any) -> str:
    path = frame.file_path or ""
    try:
        path = str(Path(path).resolve().relative_to(REPO_ROOT))
    except (ValueError, OSError):
        marker = "site-packages/"
        path = path.split(marker, 1)[1] if marker in path else (frame.file_path_short or path)
    return f"{path}:{frame.line_no}"


def hot_spots(
    session: Any, *, top: int = 12, focus: tuple[str, ...] = ("serving/", "pipelines/", "monitoring/", "medops/")
) -> dict[str, Any]:
    """The ``top`` functions by inclusive and by self time; ``medops`` lists only medops code."""
    root = session.root_frame()
    if root is None:
        return {"seconds": 0.0, "inclusive": [], "self": [], "medops": []}
    total = root.time or 1e-9
    inclusive: dict[str, float] = defaultdict(float)
    own: dict[str, float] = defaultdict(float)
    _walk(root, (), inclusive, own, set())

    def listing(table: dict[str, float], keep=lambda key: True) -> list[dict[str, Any]]:
        ranked = sorted(((v, k) for k, v in table.items() if keep(k)), reverse=True)[:top]
        return [{"function": k, "seconds": round(v, 3), "share": round(v / total, 3)} for v, k in ranked]

    def is_medops(key: str) -> bool:
        where = key.rsplit("(", 1)[-1]
        return where.startswith(focus) or where.startswith("dags/")

    medops = listing(inclusive, is_medops)
    return {
        "seconds": round(total, 3),
        "inclusive": listing(inclusive),
        "self": listing(own),
        "medops": medops,
        "breakdown": {item["function"]: _callees(root, item["function"], total, top) for item in medops[:4]},
    }


def _callees(root: Any, key: str, total: float, top: int) -> list[dict[str, Any]]:
    """What ``key`` spends its time in: its direct callees (and own code), summed over every call."""
    found: dict[str, float] = defaultdict(float)

    def visit(frame: Any) -> None:
        if not frame.is_synthetic and f"{frame.function} ({_where(frame)})" == key:
            found["(own code)"] += frame.total_self_time
            for child in frame.children:
                _collect(child, found)
            return
        for child in frame.children:
            visit(child)

    visit(root)
    ranked = sorted(((v, k) for k, v in found.items()), reverse=True)[:top]
    return [{"function": k, "seconds": round(v, 3), "share": round(v / total, 3)} for v, k in ranked]


def _collect(frame: Any, found: dict[str, float]) -> None:
    """Attribute a synthetic frame's time to its real callees (pyinstrument groups library frames)."""
    if frame.is_synthetic:
        for child in frame.children:
            _collect(child, found)
    else:
        found[f"{frame.function} ({_where(frame)})"] += frame.time


def save(session: Any, name: str) -> dict[str, str]:
    """Write the session as HTML and text under ``bench/results/profiles/``; returns the paths."""
    from pyinstrument.renderers import ConsoleRenderer, HTMLRenderer

    PROFILES_DIR.mkdir(parents=True, exist_ok=True)
    html = PROFILES_DIR / f"{name}.html"
    text = PROFILES_DIR / f"{name}.txt"
    html.write_text(HTMLRenderer().render(session))
    text.write_text(ConsoleRenderer(unicode=False, color=False, show_all=False).render(session))
    return {"html": str(html.relative_to(REPO_ROOT)), "text": str(text.relative_to(REPO_ROOT))}
