"""Drift at scale: the monitor_drift computation against a plain Evidently ``DataDriftPreset`` run.

Frames: a prediction-log window of ``n`` rows (the log's columns: 30 features, site_id over four
sites, probability_malignant, label, model_version, encounter_hash, ...) in which ten features
are scaled by 1.15, and the reference the DAG uses: the seed's training split (455 rows) scored
by a logistic-regression champion. Both are written once as Parquet and every measurement runs
in a fresh process that loads them, then times only the computation:

- ``medops``: ``monitoring.drift.detect_drift(current, reference, settings)`` as
  ``monitoring.reports.run_monitoring`` calls it (per-site verdicts, prediction drift and the
  Evidently report on a sample included);
- ``plain``: ``Report([DataDriftPreset(columns=FEATURES)]).run(current, reference)``;
- ``read_log`` (``--drift-read-log``): ``pipelines.prediction_log.read_predictions`` of the largest
  window written as the service's CSV log, the other large step of a monitoring run (no goal;
  off by default to keep ``make bench`` within 15 minutes).

Each measurement runs in a child forked from a parent that has only imported the libraries
(:func:`bench.common.in_fresh_fork`): fresh memory counters and state, no import time. Peak RSS is
the child's peak over its whole life (inherited imports and the loaded frames included);
``compute_peak`` is the peak during the computation alone.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from bench import fixtures
from bench.common import (
    SectionResult,
    fmt,
    gib,
    in_fresh_fork,
    median,
    peak_memory,
    ratio,
)

SHIFTED = (
    "mean_radius",
    "mean_texture",
    "mean_perimeter",
    "mean_area",
    "mean_concavity",
    "worst_radius",
    "worst_texture",
    "worst_perimeter",
    "worst_area",
    "worst_concavity",
)
SHIFT = 1.15
PLAIN_MAX_ROWS = 100_000


def reference_frame() -> Any:
    """The champion's training rows as monitor_drift builds them, with the champion's scores."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from pipelines.holdout import split_by_row_key
    from pipelines.protocol import load_protocol
    from pipelines.schema import FEATURES, LABEL, POSITIVE

    train, _ = split_by_row_key(fixtures.seed(), load_protocol().automatic.holdout_share)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    model.fit(train[list(FEATURES)], train[LABEL] == POSITIVE)
    train["probability_malignant"] = model.predict_proba(train[list(FEATURES)])[:, 1]
    return train, model


def current_window(n: int, model: Any, rng_seed: int = 7) -> Any:
    """``n`` prediction-log rows (the columns ``read_predictions`` returns), ten features drifted."""
    import numpy as np
    import pandas as pd

    from pipelines.schema import FEATURES

    frame = fixtures.synthetic_rows(n, rng_seed=rng_seed, shift=dict.fromkeys(SHIFTED, SHIFT))
    rng = np.random.default_rng(rng_seed + 1)
    probability = model.predict_proba(frame[list(FEATURES)])[:, 1]
    log = pd.DataFrame(
        {
            "logged_at": pd.Timestamp("2026-05-01", tz="UTC") + pd.to_timedelta(np.arange(n) * 3, unit="ms"),
            "request_id": _hex_strings(rng, n, 16),
            "model_name": "breast_cancer_diagnosis",
            "model_version": "1",
            "site_id": frame["site_id"].to_numpy(),
            "encounter_hash": _hex_strings(rng, n, 32),
        }
    )
    for name in FEATURES:
        log[name] = frame[name].to_numpy()
    log["probability_malignant"] = probability
    log["label"] = np.where(probability >= 0.5, "malignant", "benign")
    return log


def _hex_strings(rng: Any, n: int, n_bytes: int) -> Any:
    """``n`` random hex strings of ``2 * n_bytes`` characters (ids, HMAC digests), built without a Python loop."""
    import binascii

    import numpy as np

    text = binascii.hexlify(rng.bytes(n * n_bytes))
    return np.frombuffer(text, dtype=f"S{2 * n_bytes}").astype(str).astype(object)


def write_prediction_log(frame: Any, home: Path) -> Path:
    """The window as the service's CSV prediction log under ``home`` (pyarrow: pandas takes a minute)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    from medops.core.settings import Settings
    from pipelines.prediction_log import PREDICTION_COLUMNS, predictions_log_dir

    rows = frame[list(PREDICTION_COLUMNS)].copy()
    rows["logged_at"] = rows["logged_at"].dt.strftime("%Y-%m-%dT%H:%M:%S.%f+00:00")
    folder = predictions_log_dir(Settings(home=home))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "predictions-20260501-1.csv"
    pacsv.write_csv(pa.Table.from_pandas(rows, preserve_index=False), path)
    return path


# The measured child --------------------------------------------------------------------------------
def _warm_imports() -> None:
    """Import what the measured work imports, in the parent, so a forked child times only the work."""
    import evidently.legacy.calculations.stattests  # noqa: F401
    import evidently.presets  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    import scipy.stats  # noqa: F401
    from evidently import DataDefinition, Dataset, Report  # noqa: F401

    import monitoring.drift  # noqa: F401
    import pipelines.prediction_log  # noqa: F401


def measure(mode: str, current_path: str, reference_path: str) -> dict[str, Any]:
    """One measurement (run it in a fresh fork): load the frames, then time ``mode``'s computation."""
    import pandas as pd

    from medops.core.settings import Settings
    from pipelines.schema import FEATURES

    settings = Settings()
    if mode == "read_log":
        from pipelines.prediction_log import read_predictions

        with peak_memory() as memory:
            started = time.perf_counter()
            frame = read_predictions(Settings(home=Path(current_path)))  # a MEDOPS_HOME holding the CSV log
            seconds = time.perf_counter() - started
        return {
            "seconds": seconds,
            "rows": len(frame),
            "peak_rss": memory.peak,
            "compute_peak": memory.during,
            "rss_before": memory.before,
        }

    current = pd.read_parquet(current_path)
    reference = pd.read_parquet(reference_path)
    if mode == "medops":
        from monitoring.drift import detect_drift

        with peak_memory() as memory:
            started = time.perf_counter()
            found = detect_drift(current, reference, settings)
            seconds = time.perf_counter() - started
        drifted = sorted(name for name, column in found.columns.items() if column.drifted)
        verdict, share = str(found.verdict), found.share
    else:
        from evidently import DataDefinition, Dataset, Report
        from evidently.presets import DataDriftPreset

        definition = DataDefinition(numerical_columns=list(FEATURES))
        with peak_memory() as memory:
            started = time.perf_counter()
            snapshot = Report(
                [DataDriftPreset(columns=list(FEATURES), drift_share=settings.drift_share_threshold)]
            ).run(
                Dataset.from_pandas(current[list(FEATURES)], data_definition=definition),
                Dataset.from_pandas(reference[list(FEATURES)], data_definition=definition),
            )
            seconds = time.perf_counter() - started
        drifted, share = _plain_verdicts(snapshot.dict()["metrics"])
        verdict = "drift" if share >= settings.drift_share_threshold else "no_drift"
    return {
        "seconds": seconds,
        "rows": len(current),
        "peak_rss": memory.peak,
        "compute_peak": memory.during,
        "rss_before": memory.before,
        "drifted_columns": drifted,
        "verdict": verdict,
        "share": share,
    }


def _plain_verdicts(metrics: list[dict[str, Any]]) -> tuple[list[str], float]:
    """Drifted columns as Evidently decides them: p-values at or below, distances at or above the threshold."""
    drifted, share = [], 0.0
    for metric in metrics:
        config = metric.get("config", {})
        if config.get("type", "").endswith("DriftedColumnsCount"):
            share = float(metric["value"]["share"])
        elif config.get("type", "").endswith("ValueDrift"):
            value, threshold = float(metric["value"]), float(config["threshold"])
            is_p_value = "p_value" in str(config.get("method", ""))
            if (value <= threshold) if is_p_value else (value >= threshold):
                drifted.append(config["column"])
    return sorted(drifted), share


# The section ---------------------------------------------------------------------------------------
def run(
    quick: bool = False,
    runs: int = 3,
    plain_max_rows: int | None = None,
    profile: bool = False,
    read_log: bool = False,
) -> SectionResult:
    section = SectionResult("drift")
    sizes = [2_000, 10_000] if quick else [10_000, 100_000, 1_000_000]
    # Plain Evidently needs 50-100 s for 1M rows here; three runs of it do not fit in make bench's
    # 15 minutes, so above PLAIN_MAX_ROWS it runs once (in the first round, interleaved with medops).
    # --plain-max-rows N stops it above N rows altogether.
    plain_cap = plain_max_rows or (10_000 if quick else sizes[-1])
    section.params = {
        "sizes": sizes,
        "plain_evidently_max_rows": plain_cap,
        "plain_evidently_runs_above_100k_rows": 1,
        "runs": runs,
        "shifted_columns": list(SHIFTED),
        "shift": SHIFT,
        "reference_rows": None,
    }
    child_timeout = 600
    _warm_imports()
    with tempfile.TemporaryDirectory(prefix="medops-bench-drift-") as tmp:
        folder = Path(tmp)
        reference, model = reference_frame()
        section.params["reference_rows"] = len(reference)
        reference_path = folder / "reference.parquet"
        reference.to_parquet(reference_path)
        results: dict[str, dict[str, list[dict[str, Any]]]] = {}
        for n in sizes:
            current = current_window(n, model)
            current_path = folder / f"current-{n}.parquet"
            current.to_parquet(current_path)
            modes = ["medops"] + (["plain"] if n <= plain_cap else [])
            if read_log and n == sizes[-1]:
                log_home = folder / "log-home"
                write_prediction_log(current, log_home)
                modes.append("read_log")
            del current
            results[str(n)] = {mode: [] for mode in modes}
            for round_ in range(runs):
                for mode in modes:
                    if mode == "plain" and n > PLAIN_MAX_ROWS and round_ > 0:
                        continue
                    path = log_home if mode == "read_log" else current_path
                    results[str(n)][mode].append(
                        in_fresh_fork(measure, mode, str(path), str(reference_path), timeout=child_timeout)
                    )
            current_path.unlink()
    section.data["runs"] = results
    _rows_and_goals(section, results, sizes, plain_cap)
    if profile and not all(goal.met for goal in section.goals):
        section.data["profile"] = in_fresh_fork(profile_drift, sizes[-1], timeout=child_timeout)
    return section


def _rows_and_goals(section: SectionResult, results: dict, sizes: list[int], plain_cap: int) -> None:
    largest = str(sizes[-1])
    medians: dict[str, dict[str, float | None]] = {}
    for n in sizes:
        by_mode = results[str(n)]
        plain = by_mode.get("plain")
        m = medians[str(n)] = {
            "medops_s": median([r["seconds"] for r in by_mode["medops"]]),
            "medops_rss": median([r["peak_rss"] for r in by_mode["medops"]]),
            "plain_s": median([r["seconds"] for r in plain]) if plain else None,
            "plain_rss": median([r["peak_rss"] for r in plain]) if plain else None,
        }
        at_largest = str(n) == largest
        case = f"{n:,} rows x 30 features"
        section.row(
            case,
            "wall time",
            fmt(m["medops_s"], " s"),
            fmt(m["plain_s"], " s") if plain else f"not run (cap {plain_cap:,} rows)",
            ratio(m["medops_s"], m["plain_s"]),
            "plain DataDriftPreset",
            "<= 10 s" if at_largest else "",
            ((m["medops_s"] or 1e9) <= 10) if at_largest else None,
            lower_is_better=True,
        )
        section.row(
            case,
            "peak RSS",
            gib(m["medops_rss"]),
            gib(m["plain_rss"]) if plain else "not run",
            ratio(m["medops_rss"], m["plain_rss"]),
            "plain DataDriftPreset",
            "<= 2 GiB" if at_largest else "",
            ((m["medops_rss"] or 1e18) <= 2 * 2**30) if at_largest else None,
            lower_is_better=True,
        )
        if plain:
            medops = by_mode["medops"]
            same = all(
                a["drifted_columns"] == b["drifted_columns"] and a["verdict"] == b["verdict"]
                for a, b in zip(medops, plain, strict=False)
            )
            section.row(
                case,
                "verdict, drifted columns",
                f"{medops[0]['verdict']}, {len(medops[0]['drifted_columns'])}",
                f"{plain[0]['verdict']}, {len(plain[0]['drifted_columns'])}",
                None,
                "plain DataDriftPreset",
                "same",
                same,
            )
            section.data.setdefault("verdicts", {})[str(n)] = {
                "same": same,
                "medops": medops[0]["drifted_columns"],
                "plain": plain[0]["drifted_columns"],
            }
        if "read_log" in by_mode:
            read = by_mode["read_log"]
            section.row(
                case,
                "read_predictions of the CSV log",
                fmt(median([r["seconds"] for r in read]), " s"),
                f"no baseline; peak RSS {gib(median([r['peak_rss'] for r in read]))}",
                None,
                "",
            )
    section.data["medians"] = medians
    big = medians[largest]
    section.goal(
        f"drift on {int(largest):,} rows: time", "<= 10 s", fmt(big["medops_s"], " s"), (big["medops_s"] or 1e9) <= 10
    )
    section.goal(
        f"drift on {int(largest):,} rows: memory",
        "<= 2 GiB",
        gib(big["medops_rss"]),
        (big["medops_rss"] or 1e18) <= 2 * 2**30,
    )
    compared = [n for n in sizes if medians[str(n)]["plain_s"] is not None]
    if compared:
        at = compared[-1]
        speedup = ratio(medians[str(at)]["plain_s"], medians[str(at)]["medops_s"])
        where = f"at {at:,} rows"
        if str(at) != largest:
            where += f" (plain Evidently capped; goal is at {int(largest):,})"
        section.goal(
            f"drift vs plain Evidently {where}",
            ">= 5x faster at 1M rows",
            f"{fmt(speedup)}x faster",
            (speedup >= 5) if str(at) == largest and speedup is not None else None,
        )
    verdicts = section.data.get("verdicts", {})
    section.goal(
        "same verdicts as plain Evidently",
        "same drifted columns and verdict",
        ", ".join(f"{int(n):,} rows: {'same' if v['same'] else 'DIFFERENT'}" for n, v in verdicts.items()),
        all(v["same"] for v in verdicts.values()) if verdicts else None,
    )


def profile_drift(n: int) -> dict[str, Any]:
    """pyinstrument over one detect_drift call on ``n`` rows (in this fresh process)."""
    from pyinstrument import Profiler

    from bench.profiling import hot_spots, save
    from medops.core.settings import Settings
    from monitoring.drift import detect_drift

    reference, model = reference_frame()
    current = current_window(n, model)
    profiler = Profiler(interval=0.001)
    profiler.start()
    detect_drift(current, reference, Settings())
    session = profiler.stop()
    return {"hot_spots": hot_spots(session), "files": save(session, f"drift-{n}-rows")}
