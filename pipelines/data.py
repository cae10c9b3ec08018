"""The seed dataset and CSV reading shared by ingest and training."""

from __future__ import annotations

import csv
import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from medops.core.files import atomic_writer
from pipelines.schema import DATA_COLUMNS, FEATURES, LABEL, NEGATIVE, POSITIVE, SITE

SEED_FILE = "seed.csv"
SEED_SITES = ("site-a", "site-b", "site-c")
# Fixed text format so the seed's bytes, and so data.dvc's hash, are the same on every machine.
FLOAT_FORMAT = "%.10g"


def seed_frame() -> pd.DataFrame:
    """The Wisconsin diagnostic breast cancer data as medops stores it: the label spelled out (sklearn
    codes malignant as 0), snake_case columns, a ``site_id`` round-robin over three seed hospitals."""
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer(as_frame=True)
    frame = bunch.data.rename(columns=lambda name: name.replace(" ", "_"))[list(FEATURES)].astype("float64")
    frame[LABEL] = [POSITIVE if code == 0 else NEGATIVE for code in bunch.target]
    frame[SITE] = [SEED_SITES[i % len(SEED_SITES)] for i in range(len(frame))]
    return frame[list(DATA_COLUMNS)]


def write_frame(frame: pd.DataFrame, path: Path) -> Path:
    """Write data rows in the registry's canonical CSV format, atomically.

    The bytes are ``to_csv(index=False, float_format=FLOAT_FORMAT, lineterminator="\\n")``'s (a test
    holds them equal), ten times faster: pyarrow writes each float's shortest form, which is
    ``FLOAT_FORMAT``'s text whenever it has at most ten digits and no exponent, and ``%`` the rest.
    """
    table, needs_quotes = _text_table(frame)
    with atomic_writer(path) as handle:
        if needs_quotes:  # the csv module quotes as pandas does
            _write_with_csv_module(table, handle)
        else:
            import pyarrow.csv as pacsv

            handle.write((",".join(DATA_COLUMNS) + "\n").encode())
            pacsv.write_csv(table, handle, pacsv.WriteOptions(include_header=False, quoting_style="none"))
    return path


def _text_table(frame: pd.DataFrame):
    """Every field as the text pandas would write, in a pyarrow table, and whether some text needs quotes."""
    import pyarrow as pa
    import pyarrow.compute as pc

    floats = [name for name in DATA_COLUMNS if frame[name].dtype.kind == "f"]
    # pyarrow and numpy release the GIL: float columns format in parallel on every core
    with ThreadPoolExecutor(max_workers=min(len(floats) or 1, os.cpu_count() or 1)) as pool:
        formatted = pool.map(_float_texts, [frame[name].to_numpy(dtype="float64") for name in floats])
        columns = dict(zip(floats, formatted, strict=True))
    needs_quotes = False
    for name in DATA_COLUMNS:
        if name in columns:
            continue
        try:
            texts = pa.array(frame[name].to_numpy(dtype=object), type=pa.string(), from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # not all text: write what str() gives, as pandas does
            texts = pa.array([None if pd.isna(v) else str(v) for v in frame[name].tolist()], type=pa.string())
        needs_quotes = needs_quotes or pc.any(pc.match_substring_regex(texts, '[,"\r\n]')).as_py()
        columns[name] = texts
    return pa.table({name: columns[name] for name in DATA_COLUMNS}), needs_quotes


def _float_texts(values: np.ndarray):
    """FLOAT_FORMAT's text of each value, as a pyarrow string array (null for NaN)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    texts = pc.cast(pa.array(values, from_pandas=True), pa.string())  # shortest round-trip text
    magnitude = np.abs(values)
    positional = (magnitude >= 1e-4) & (magnitude < 1e10)  # where %g writes no exponent
    same = (magnitude == 0) | (positional & _ten_digits_at_most(magnitude))
    same &= ~pc.fill_null(pc.match_substring(texts, "e"), False).to_numpy(zero_copy_only=False)
    redo = ~same & ~np.isnan(values)
    if not redo.any():
        return texts
    replacement = np.full(len(values), None, dtype=object)
    replacement[redo] = [FLOAT_FORMAT % value for value in values[redo].tolist()]
    return pc.if_else(pa.array(redo), pa.array(replacement, type=pa.string()), texts)


def _ten_digits_at_most(magnitude: np.ndarray) -> np.ndarray:
    """Whether each positive value is the double nearest some decimal of at most ten significant digits.

    Exactly then its shortest round-trip text has at most ten digits and equals ``%.10g``'s. N is
    the value scaled to ten digits and rounded: an integer below 1e10 and a power of ten up to 1e13
    are exact doubles, so N / 10**d is the double nearest N * 10**-d and equals the value only if
    the value is that double. A log10 off by one near a power of ten gives a false "no" (the value
    is then formatted by ``%``), never a false "yes".
    """
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        scale = 10.0 ** (9 - np.floor(np.log10(magnitude)))
        scaled = np.rint(magnitude * scale)
        return (scaled < 1e10) & (scaled / scale == magnitude)


def _write_with_csv_module(table, handle) -> None:
    text = io.TextIOWrapper(handle, encoding="utf-8", newline="")
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(DATA_COLUMNS)
    fields = [["" if v is None else v for v in table.column(name).to_pylist()] for name in DATA_COLUMNS]
    writer.writerows(zip(*fields, strict=True))
    text.flush()
    text.detach()


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
