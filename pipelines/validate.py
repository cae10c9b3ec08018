"""Validation of incoming clinical batches against the data contract.

Every row of a batch ends accepted or rejected with a reason; a batch that cannot be read as the
contract's CSV at all (empty, binary, unknown or missing columns) is rejected whole. Types are checked
on the raw text first, so that "not a number" and "missing" stay distinct reasons; ranges, labels and
sites then with numpy on whole columns (:func:`pandera_schema` states the same rules for the tests).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.schema import (
    CLASSES,
    DATA_COLUMNS,
    ENCOUNTER,
    FEATURE_RANGES,
    FEATURES,
    LABEL,
    NEGATIVE,
    POSITIVE,
    SITE,
    SITE_PATTERN,
)

REASON = "reason"
ROW_NUMBER = "row_number"
OPTIONAL_COLUMNS = (ENCOUNTER,)


class BatchRejected(Exception):
    """The whole batch is unusable; the message is the reason recorded in quarantine."""


@dataclass(frozen=True)
class ValidationResult:
    """Typed accepted rows, and rejected rows as received plus their ``row_number`` and ``reason``."""

    accepted: pd.DataFrame
    rejected: pd.DataFrame

    @property
    def received(self) -> int:
        return len(self.accepted) + len(self.rejected)


def read_batch(path: Path) -> pd.DataFrame:
    """Read a landed file, or raise :class:`BatchRejected` saying why it is unusable. A numeric column
    holding anything but numbers stays text, so that the offending value can be named in the reason."""
    if not path.exists():
        raise BatchRejected(f"file not found: {path.name}")
    with path.open("rb") as handle:
        head = handle.read(8192)
    if not head.strip():
        raise BatchRejected("empty file: no header and no rows")
    if b"\x00" in head:
        raise BatchRejected("not a CSV file: binary content")
    try:
        with warnings.catch_warnings():
            # a column read in chunks may hold floats and text side by side: _features handles both
            warnings.simplefilter("ignore", pd.errors.DtypeWarning)
            # a first row longer than the header would otherwise shift every value one column left
            warnings.simplefilter("error", pd.errors.ParserWarning)
            raw = pd.read_csv(
                path,
                dtype={LABEL: str, SITE: str, ENCOUNTER: str},
                keep_default_na=False,
                na_values=[""],
                encoding="utf-8",
                engine="c",
                index_col=False,
            )
    except pd.errors.ParserWarning:
        raise BatchRejected("not a readable CSV file: a row has more fields than the header") from None
    except UnicodeDecodeError:
        raise BatchRejected("not a CSV file: not UTF-8 text") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as error:
        raise BatchRejected(f"not a readable CSV file: {str(error).splitlines()[0]}") from None
    raw.columns = [str(name).strip() for name in raw.columns]
    return raw


def check_columns(raw: pd.DataFrame, site_id: str | None) -> None:
    """Reject the batch whole when its columns are not the contract's."""
    columns = set(raw.columns)
    known = set(DATA_COLUMNS) | set(OPTIONAL_COLUMNS)
    if not columns & known:
        raise BatchRejected("no usable column: none of the header's columns belongs to the data contract")
    unknown = sorted(columns - known)
    if unknown:
        raise BatchRejected(
            f"unknown column(s) {', '.join(unknown)}: not part of the data contract; the batch is kept "
            "whole in quarantine because such columns may carry patient identifiers"
        )
    missing = [c for c in DATA_COLUMNS if c not in columns and (c != SITE or site_id is None)]
    if missing:
        raise BatchRejected(f"missing required column(s): {', '.join(missing)}")
    if len(raw) == 0:
        raise BatchRejected("no rows: the file has a header only")


@cache
def pandera_schema():
    """The typed-row contract as a pandera schema, for a notebook or another pipeline.

    :func:`validate_batch` checks exactly these rules with numpy (pandera's own pass cost a third of
    the time on a 1M-row batch); the tests hold the two to the same verdicts.
    """
    import pandera.pandas as pa

    columns = {
        name: pa.Column("float64", pa.Check.in_range(low, high), nullable=True)
        for name, (low, high) in FEATURE_RANGES.items()
    }
    columns[LABEL] = pa.Column(str, pa.Check.isin(list(CLASSES)), nullable=True)
    columns[SITE] = pa.Column(str, pa.Check.str_matches(SITE_PATTERN), nullable=True)
    return pa.DataFrameSchema(columns, strict=False, coerce=False)


class _Failures:
    """Row failures collected as row positions; text is built only for the rows that failed."""

    def __init__(self, n_rows: int) -> None:
        self.n_rows = n_rows
        self.parts: list[tuple[np.ndarray, str | list[str]]] = []

    def add(self, rows: np.ndarray, message: str | list[str]) -> None:
        """``rows`` are positions or a boolean mask; ``message`` is one text or one per row."""
        rows = np.flatnonzero(rows) if rows.dtype == bool else rows
        if rows.size:
            self.parts.append((rows, message))

    def bad(self) -> np.ndarray:
        """A boolean mask of the rows that failed at least one check."""
        mask = np.zeros(self.n_rows, dtype=bool)
        for rows, _ in self.parts:
            mask[rows] = True
        return mask

    def reasons(self, bad: np.ndarray) -> list[str]:
        """One reason per failed row, in row order: every problem of the row, in contract order."""
        position = np.cumsum(bad) - 1
        texts: list[list[str]] = [[] for _ in range(int(bad.sum()))]
        for rows, message in self.parts:
            messages = [message] * len(rows) if isinstance(message, str) else message
            for at, text in zip(position[rows].tolist(), messages, strict=True):
                texts[at].append(text)
        return ["; ".join(parts) for parts in texts]


def _features(raw: pd.DataFrame, failures: _Failures) -> np.ndarray:
    """The features as one float block, shape (feature, row); NaN where a value failed its type."""
    block = np.empty((len(FEATURES), len(raw)), dtype="float64")
    for i, name in enumerate(FEATURES):
        column = raw[name]
        if column.dtype.kind in "fiu":
            block[i] = column.to_numpy(dtype="float64")
            failures.add(np.isnan(block[i]), f"{name}: missing value")
        else:
            # as Python objects, so that numbers parse and anything else can be named
            objects = (column.astype(str) if column.dtype.kind == "b" else column).astype(object)
            block[i] = pd.to_numeric(objects, errors="coerce").to_numpy(dtype="float64", na_value=np.nan)
            unparsed = np.flatnonzero(np.isnan(block[i]))
            if unparsed.size:  # only these rows need their text looked at
                _untyped_values(name, objects.iloc[unparsed], unparsed, block[i], failures)
        infinite = np.flatnonzero(np.isinf(block[i]))
        failures.add(infinite, f"{name}: not a finite number")
        block[i, infinite] = np.nan
    return block


def _untyped_values(name: str, texts: pd.Series, rows: np.ndarray, values: np.ndarray, failures: _Failures) -> None:
    """Sort values that did not parse into missing, numbers with padding, and not-a-number."""
    stripped = texts.astype("string").str.strip()
    missing = (stripped.isna() | stripped.eq("")).to_numpy()
    failures.add(rows[missing], f"{name}: missing value")
    reparsed = pd.to_numeric(stripped, errors="coerce").to_numpy(dtype="float64", na_value=np.nan)
    values[rows] = reparsed
    not_number = np.isnan(reparsed) & ~missing
    got = stripped[not_number].str.slice(0, 40).tolist()
    failures.add(rows[not_number], [f"{name}: not a number (got '{text}')" for text in got])


def _range_failures(block: np.ndarray, failures: _Failures) -> None:
    """Values outside the plausible range; a missing or failed value (NaN) is reported once, elsewhere."""
    for i, (name, (low, high)) in enumerate(FEATURE_RANGES.items()):
        values = block[i]
        rows = np.flatnonzero((values < low) | (values > high))
        failures.add(rows, [_describe_failure(name, value) for value in values[rows].tolist()])


def _normalised_text(column: pd.Series | None, n_rows: int, lower: bool, fill: str | None = None) -> pd.Categorical:
    """Stripped (and lower-cased) text per row, missing where absent or blank unless ``fill`` is given;
    worked out once per distinct value (a batch holds a handful of labels and sites)."""
    if column is None and fill:
        return pd.Categorical.from_codes(np.zeros(n_rows, dtype="int8"), [fill])
    if column is None:
        return pd.Categorical([None] * n_rows)
    codes, distinct = pd.factorize(column, use_na_sentinel=True)
    texts = [str(value).strip() for value in distinct]
    cleaned = [(text.lower() if lower else text) or fill for text in texts] + [fill]  # last: a missing value (code -1)
    new_codes, categories = pd.factorize(pd.Series(cleaned, dtype=object), use_na_sentinel=True)
    return pd.Categorical.from_codes(new_codes[codes], categories)


def _text_failures(labels: pd.Categorical, sites: pd.Categorical, failures: _Failures) -> None:
    """Missing, unknown labels and malformed sites, judged once per distinct value."""
    site_pattern = re.compile(SITE_PATTERN)
    for name, values, valid in (
        (LABEL, labels, lambda text: text in CLASSES),
        (SITE, sites, lambda text: site_pattern.match(text) is not None),
    ):
        failures.add(values.codes == -1, f"{name}: missing value")
        invalid = [code for code, text in enumerate(values.categories) if not valid(text)]
        if invalid:
            rows = np.flatnonzero(np.isin(values.codes, invalid))
            failures.add(rows, [_describe_failure(name, text) for text in values[rows]])


def _describe_failure(column: str, value: object) -> str:
    if column in FEATURE_RANGES:
        low, high = FEATURE_RANGES[column]
        return f"{column}: out of plausible range [{low:g}, {high:g}] (got {value})"
    if column == LABEL:
        return f"{LABEL}: must be '{POSITIVE}' or '{NEGATIVE}' (got '{str(value)[:40]}')"
    return f"{SITE}: not a valid site id (got '{str(value)[:40]}')"


def row_keys(frame: pd.DataFrame) -> np.ndarray:
    """A content hash per row over the contract's columns, to find duplicate rows."""
    columns = frame if list(frame.columns) == list(DATA_COLUMNS) else frame[list(DATA_COLUMNS)]
    return pd.util.hash_pandas_object(columns, index=False).to_numpy()


def validate_batch(
    raw: pd.DataFrame, site_id: str | None = None, existing_keys: np.ndarray | None = None
) -> ValidationResult:
    """Split a raw text batch into typed accepted rows and rejected rows with every reason.

    ``site_id`` fills rows that name no site; rows whose :func:`row_keys` are in ``existing_keys`` (the
    current data version's) are rejected as repeats. Raises :class:`BatchRejected` when the columns make
    every row unusable. Text is built only for the rows that failed (see ``make bench``).
    """
    check_columns(raw, site_id)
    n_rows = len(raw)
    failures = _Failures(n_rows)
    block = _features(raw, failures)
    _range_failures(block, failures)
    labels = _normalised_text(raw[LABEL], n_rows, lower=True)
    sites = _normalised_text(raw[SITE] if SITE in raw.columns else None, n_rows, lower=False, fill=site_id)
    _text_failures(labels, sites, failures)
    bad = failures.bad()
    rejected_rows = [np.flatnonzero(bad)]
    reasons = failures.reasons(bad)

    candidates = np.flatnonzero(~bad)
    if bad.any():
        block, labels, sites = block[:, candidates], labels[candidates], sites[candidates]
    accepted = pd.DataFrame(block.T, columns=list(FEATURES), copy=False)
    accepted[LABEL] = labels
    accepted[SITE] = sites
    keys = row_keys(accepted)  # categories hash as their values do, and a handful of them hash fast
    accepted[LABEL] = np.asarray(labels, dtype=object)
    accepted[SITE] = np.asarray(sites, dtype=object)
    repeated = pd.Series(keys).duplicated(keep="first").to_numpy()
    known = np.zeros_like(repeated)
    if existing_keys is not None and len(existing_keys):
        known = np.isin(keys, existing_keys) & ~repeated
    if repeated.any() or known.any():
        rejected_rows += [candidates[repeated], candidates[known]]
        reasons += ["duplicate of an earlier row in this batch"] * int(repeated.sum())
        reasons += ["duplicate of a row already in the data registry"] * int(known.sum())
        accepted = accepted[~(repeated | known)].reset_index(drop=True)

    rows = np.concatenate(rejected_rows)
    order = np.argsort(rows, kind="stable")
    rows = rows[order]
    rejected = raw.iloc[rows].reset_index(drop=True)
    rejected.insert(0, ROW_NUMBER, rows + 2)  # the header is line 1 of the file
    rejected[REASON] = np.asarray(reasons, dtype=object)[order] if len(rows) else np.array([], dtype=object)
    return ValidationResult(accepted=accepted, rejected=rejected)
