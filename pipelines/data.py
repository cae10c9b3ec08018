"""The seed dataset and CSV reading shared by ingest and training."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipelines.schema import DATA_COLUMNS, FEATURES, LABEL, NEGATIVE, POSITIVE, SITE

SEED_FILE = "seed.csv"
SEED_SITES = ("site-a", "site-b", "site-c")
# Fixed text format so the seed's bytes, and so data.dvc's hash, are the same on every machine.
FLOAT_FORMAT = "%.10g"


def seed_frame() -> pd.DataFrame:
    """The Wisconsin diagnostic breast cancer data as medops stores it.

    scikit-learn codes malignant as 0 and benign as 1; here the label is spelled out, columns are
    snake_case, and each row gets a ``site_id`` round-robin over three seed hospitals.
    """
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer(as_frame=True)
    frame = bunch.data.rename(columns=lambda name: name.replace(" ", "_"))
    frame = frame[list(FEATURES)].astype("float64")
    frame[LABEL] = [POSITIVE if code == 0 else NEGATIVE for code in bunch.target]
    frame[SITE] = [SEED_SITES[i % len(SEED_SITES)] for i in range(len(frame))]
    return frame[list(DATA_COLUMNS)]


def write_frame(frame: pd.DataFrame, path: Path) -> Path:
    """Write data rows in the registry's canonical CSV format."""
    path.parent.mkdir(parents=True, exist_ok=True)
    frame[list(DATA_COLUMNS)].to_csv(path, index=False, float_format=FLOAT_FORMAT, lineterminator="\n")
    return path


def write_seed(data_dir: Path) -> Path:
    """Write ``data_dir/seed.csv`` deterministically (data version v1)."""
    return write_frame(seed_frame(), data_dir / SEED_FILE)


def read_data_dir(data_dir: Path) -> pd.DataFrame:
    """All rows of a data version: every CSV under ``data_dir`` in name order (seed first)."""
    files = sorted(data_dir.glob("*.csv"), key=lambda p: (p.name != SEED_FILE, p.name))
    if not files:
        raise FileNotFoundError(f"no CSV files in {data_dir}")
    dtypes = {name: "float64" for name in FEATURES} | {LABEL: "string", SITE: "string"}
    frames = [pd.read_csv(f, dtype=dtypes, usecols=list(DATA_COLUMNS), engine="c") for f in files]
    return pd.concat(frames, ignore_index=True)[list(DATA_COLUMNS)]
