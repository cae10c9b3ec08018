"""Ingest at scale: validating and versioning a 1,000,000-row batch, each against a plain baseline.

The batch is synthetic seed-like rows (see :mod:`bench.fixtures`) with 0.2 % bad rows (out of
range, not a number, missing label), landed as a CSV file. Measured, median of ``runs``, each
interleaved with its baseline:

- ``read_batch`` (pandas C parser with the contract's dtypes) against a bare ``pandas.read_csv``;
- ``validate_batch`` (types, ranges, labels, sites, duplicates in the batch and against the
  registry's seed rows) against a plain vectorised pandas check of the same ranges, missing
  values and duplicates, without reasons;
- versioning: ``dvc add`` + ``dvc push`` of the registry's ``data/`` once the batch file is in it
  (``pipelines.data_registry``'s own helper, which is what ``record_batch`` runs) against ``cp`` of
  the same file, both from a warm page cache;
- the registry's CSV writing of the accepted rows (``pipelines.data.write_frame``, which
  ``record_batch`` runs before DVC, in the fixed float format DVC hashes depend on) against
  ``pyarrow.csv.write_csv`` of the same frame.
"""

from __future__ import annotations

import gc
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import fixtures
from bench.common import SectionResult, fmt, median, medops_home, ratio

BAD_SHARE = 0.002
VALIDATION_GOAL = 200_000  # rows/s


def landed_batch(n: int, path: Path, rng_seed: int = 11) -> Path:
    """Write ``n`` rows as a hospital would send them, a few of them bad, with pyarrow (fast)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pacsv

    from pipelines.schema import FEATURES

    frame = fixtures.synthetic_rows(n, rng_seed=rng_seed)
    frame[list(FEATURES)] = frame[list(FEATURES)].round(5)  # as many decimals as the seed's measurements
    rng = np.random.default_rng(rng_seed)
    bad = rng.choice(n, max(1, int(n * BAD_SHARE)), replace=False)
    third = len(bad) // 3
    frame.loc[bad[:third], "mean_radius"] = 600.0  # micrometres sent for millimetres
    frame.loc[bad[third : 2 * third], "diagnosis"] = "unknown"
    texture = frame["mean_texture"].astype(str)  # the shortest repr of each float, as a CSV holds it
    texture.iloc[bad[2 * third :]] = "n/a"
    frame["mean_texture"] = texture
    table = pa.Table.from_pandas(frame, preserve_index=False)
    pacsv.write_csv(table, path, pacsv.WriteOptions(quoting_style="none"))
    return path


def plain_validation(raw: Any) -> int:
    """The baseline: the contract's ranges, missing values and duplicates as bare pandas, no reasons."""
    import numpy as np
    import pandas as pd

    from pipelines.schema import FEATURE_RANGES, FEATURES, LABEL

    numbers = raw[list(FEATURES)].apply(pd.to_numeric, errors="coerce")
    low = np.array([FEATURE_RANGES[f][0] for f in FEATURES])
    high = np.array([FEATURE_RANGES[f][1] for f in FEATURES])
    values = numbers.to_numpy()
    ok = ((values >= low) & (values <= high)).all(axis=1)
    ok &= raw[LABEL].isin(["malignant", "benign"]).to_numpy()
    ok &= ~raw.duplicated().to_numpy()
    return int(ok.sum())


def _timed(function: Any, *args: Any) -> tuple[float, Any]:
    gc.collect()
    started = time.perf_counter()
    value = function(*args)
    return time.perf_counter() - started, value


def run(quick: bool = False, runs: int = 3, profile: bool = False) -> SectionResult:
    import pandas as pd

    from pipelines.validate import read_batch, row_keys, validate_batch

    section = SectionResult("ingest")
    n = 20_000 if quick else 1_000_000
    n_write = n
    section.params = {"rows": n, "bad_row_share": BAD_SHARE, "runs": runs, "write_frame_rows": n_write}
    with tempfile.TemporaryDirectory(prefix="medops-bench-ingest-") as tmp:
        folder = Path(tmp)
        landed = landed_batch(n, folder / "landed.csv")
        section.params["file_mb"] = round(landed.stat().st_size / 1e6, 1)
        existing = row_keys(fixtures.seed())
        # first calls import pandera and build the schema: not what a 1M-row batch costs per row
        validate_batch(read_batch(landed).head(100), None, existing)
        plain_validation(pd.read_csv(landed, nrows=100))
        times: dict[str, list[float]] = {k: [] for k in ("read", "plain_read", "validate", "plain_validate")}
        counts: dict[str, Any] = {}
        for _ in range(runs):
            seconds, raw = _timed(read_batch, landed)
            times["read"].append(seconds)
            seconds, plain_raw = _timed(pd.read_csv, landed)
            times["plain_read"].append(seconds)
            del plain_raw
            seconds, result = _timed(validate_batch, raw, None, existing)
            times["validate"].append(seconds)
            counts = {"accepted": len(result.accepted), "rejected": len(result.rejected)}
            seconds, plain_ok = _timed(plain_validation, raw)
            times["plain_validate"].append(seconds)
            counts["plain_accepted"] = plain_ok
            accepted = result.accepted
            del result, raw
        section.data["counts"] = counts
        versioning = _versioning(folder, landed, accepted, runs, n_write)
        del accepted
        section.data["seconds"] = times | versioning
    _rows_and_goals(section, n, n_write)
    if profile and not all(goal.met for goal in section.goals):
        section.data["profile"] = _profile(n)
    return section


def _versioning(folder: Path, landed: Path, accepted: Any, runs: int, n_write: int) -> dict[str, list[float]]:
    """``dvc add`` + ``dvc push`` of the registry's data/ with the batch in it, against ``cp``."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    from pipelines import data_registry
    from pipelines.data import write_frame

    times: dict[str, list[float]] = {"dvc_add_push": [], "cp": [], "write_frame": [], "plain_write": []}
    sample = accepted.head(n_write)
    with medops_home("ingest") as settings:
        data_registry.init_registry(settings)
        data = settings.registry_dir / "data"
        for i in range(runs):
            # a distinct file each run, so DVC cannot reuse what it cached before
            batch = data / f"batch-bench-{i}.csv"
            shutil.copyfile(landed, batch)
            with batch.open("a") as handle:
                handle.write(f"# run {i}\n")
            batch.read_bytes()  # warm page cache for both
            started = time.perf_counter()
            data_registry._dvc_add(settings.registry_dir)
            data_registry._dvc_push(settings.registry_dir)
            times["dvc_add_push"].append(time.perf_counter() - started)
            target = folder / f"copy-{i}"
            target.mkdir()
            started = time.perf_counter()
            subprocess.run(["cp", str(batch), str(target / batch.name)], check=True)
            times["cp"].append(time.perf_counter() - started)
            shutil.rmtree(target)
            seconds, _ = _timed(write_frame, sample, folder / "write-frame.csv")
            times["write_frame"].append(seconds)
            seconds, _ = _timed(
                lambda: pacsv.write_csv(pa.Table.from_pandas(sample, preserve_index=False), folder / "plain-write.csv")
            )
            times["plain_write"].append(seconds)
    return times


def _rows_and_goals(section: SectionResult, n: int, n_write: int) -> None:
    t = {k: median(v) for k, v in section.data["seconds"].items()}
    per_s = {k: (n / v if v else None) for k, v in t.items()}
    case = f"{n:,}-row batch ({section.params['file_mb']} MB CSV)"
    section.row(
        case,
        "read_batch rows/s",
        fmt(per_s["read"]),
        fmt(per_s["plain_read"]),
        ratio(per_s["read"], per_s["plain_read"]),
        "bare pd.read_csv",
    )
    met = per_s["validate"] is not None and per_s["validate"] >= VALIDATION_GOAL
    section.row(
        case,
        "validate_batch rows/s",
        fmt(per_s["validate"]),
        fmt(per_s["plain_validate"]),
        ratio(per_s["validate"], per_s["plain_validate"]),
        "plain pandas checks",
        f">= {VALIDATION_GOAL:,}",
        met,
    )
    section.row(
        case,
        "read + validate rows/s",
        fmt(n / (t["read"] + t["validate"])),
        fmt(n / (t["plain_read"] + t["plain_validate"])),
        ratio(t["plain_read"] + t["plain_validate"], t["read"] + t["validate"]),
        "pandas",
    )
    section.row(
        case,
        "dvc add + push",
        fmt(t["dvc_add_push"], " s"),
        fmt(t["cp"], " s"),
        ratio(t["dvc_add_push"], t["cp"]),
        "cp of the file",
        lower_is_better=True,
    )
    write_rate = n_write / t["write_frame"] if t["write_frame"] else None
    plain_rate = n_write / t["plain_write"] if t["plain_write"] else None
    section.row(
        f"{n_write:,} accepted rows",
        "write_frame rows/s (record_batch)",
        fmt(write_rate),
        fmt(plain_rate),
        ratio(write_rate, plain_rate),
        "pyarrow write_csv",
    )
    section.goal(
        f"validation of a {n:,}-row batch", f">= {VALIDATION_GOAL:,} rows/s", f"{fmt(per_s['validate'])} rows/s", met
    )


def _profile(n: int) -> dict[str, Any]:
    """pyinstrument over read_batch and validate_batch of the same batch."""
    from pyinstrument import Profiler

    from bench.profiling import hot_spots, save
    from pipelines.validate import read_batch, row_keys, validate_batch

    with tempfile.TemporaryDirectory(prefix="medops-bench-ingest-profile-") as tmp:
        landed = landed_batch(n, Path(tmp) / "landed.csv")
        existing = row_keys(fixtures.seed())
        found = {}
        profiler = Profiler(interval=0.001)
        profiler.start()
        raw = read_batch(landed)
        session = profiler.stop()
        found["read_batch"] = {"hot_spots": hot_spots(session), "files": save(session, "ingest-read_batch")}
        profiler = Profiler(interval=0.001)
        profiler.start()
        validate_batch(raw, existing_keys=existing)
        session = profiler.stop()
        found["validate_batch"] = {"hot_spots": hot_spots(session), "files": save(session, "ingest-validate_batch")}
    return found
