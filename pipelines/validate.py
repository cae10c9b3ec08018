"""Validation of incoming clinical batches against the data contract.

Every row of a batch ends either accepted or rejected with a reason; a batch that cannot be read
as the contract's CSV at all (empty, binary, unknown or missing columns) is rejected whole.
Types are checked first on the raw text, so that "not a number" and "missing" stay distinct
reasons; ranges, labels and sites are then checked by a pandera schema on the typed frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.schema import DATA_COLUMNS, ENCOUNTER, FEATURE_RANGES, FEATURES, LABEL, SITE, SITE_PATTERN

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
    """Read a landed file, or raise :class:`BatchRejected` saying why it is unusable.

    Numeric columns parse as floats on the fast path; a column holding anything that is not a
    number stays text, so that the offending value can be named in the row's reason.
    """
    if not path.exists():
        raise BatchRejected(f"file not found: {path.name}")
    with path.open("rb") as handle:
        head = handle.read(8192)
    if not head.strip():
        raise BatchRejected("empty file: no header and no rows")
    if b"\x00" in head:
        raise BatchRejected("not a CSV file: binary content")
    text_columns = {LABEL: str, SITE: str, ENCOUNTER: str}
    try:
        raw = pd.read_csv(path, dtype=text_columns, keep_default_na=False, na_values=[""], encoding="utf-8", engine="c")
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
    required = [c for c in DATA_COLUMNS if c != SITE or site_id is None]
    missing = [c for c in required if c not in columns]
    if missing:
        raise BatchRejected(f"missing required column(s): {', '.join(missing)}")
    if len(raw) == 0:
        raise BatchRejected("no rows: the file has a header only")


@cache
def pandera_schema():
    """The typed-row schema: plausible physiological ranges, known labels, well-formed sites."""
    import pandera.pandas as pa

    columns = {
        name: pa.Column("float64", pa.Check.in_range(low, high), nullable=True)
        for name, (low, high) in FEATURE_RANGES.items()
    }
    columns[LABEL] = pa.Column(str, pa.Check.isin(["malignant", "benign"]), nullable=True)
    columns[SITE] = pa.Column(str, pa.Check.str_matches(SITE_PATTERN), nullable=True)
    return pa.DataFrameSchema(columns, strict=False, coerce=False)


class _Failures:
    """Row failures collected as boolean masks; text is built only for the rows that failed."""

    def __init__(self, n_rows: int) -> None:
        self.n_rows = n_rows
        self.parts: list[tuple[np.ndarray, str | pd.Series]] = []

    def add(self, mask: np.ndarray, message: str | pd.Series) -> None:
        if mask.any():
            self.parts.append((mask, message))

    def reasons(self) -> pd.Series:
        """One reason per row, empty where the row passed every check."""
        reason = pd.Series("", index=pd.RangeIndex(self.n_rows), dtype=object)
        if not self.parts:
            return reason
        bad = np.logical_or.reduce([mask for mask, _ in self.parts])
        texts: list[list[str]] = [[] for _ in range(int(bad.sum()))]
        position = np.cumsum(bad) - 1
        for mask, message in self.parts:
            rows = np.flatnonzero(mask)
            if isinstance(message, str):
                for row in rows:
                    texts[position[row]].append(message)
            else:
                for row, text in zip(rows, message.to_numpy()[rows], strict=True):
                    texts[position[row]].append(text)
        reason.iloc[np.flatnonzero(bad)] = ["; ".join(parts) for parts in texts]
        return reason


def _typed_features(raw: pd.DataFrame, failures: _Failures) -> pd.DataFrame:
    typed: dict[str, np.ndarray] = {}
    for name in FEATURES:
        column = raw[name]
        if column.dtype.kind in "fiu":
            values = column.to_numpy(dtype="float64")
            failures.add(np.isnan(values), f"{name}: missing value")
        else:
            text = column.astype("string").str.strip()
            values = pd.to_numeric(text, errors="coerce").to_numpy(dtype="float64", na_value=np.nan)
            missing = (text.isna() | text.eq("")).to_numpy()
            failures.add(missing, f"{name}: missing value")
            not_number = np.isnan(values) & ~missing
            failures.add(not_number, f"{name}: not a number (got '" + text.str.slice(0, 40) + "')")
        not_finite = np.isinf(values)
        failures.add(not_finite, f"{name}: not a finite number")
        if not_finite.any():
            values = np.where(not_finite, np.nan, values)
        typed[name] = values
    return pd.DataFrame(typed, index=raw.index)


def _schema_failures(typed: pd.DataFrame, failures: _Failures) -> None:
    import pandera.errors

    try:
        pandera_schema().validate(typed, lazy=True)
    except pandera.errors.SchemaErrors as errors:
        cases = errors.failure_cases
        cases = cases[cases["index"].notna()].reset_index(drop=True)
        for column, group in cases.groupby("column"):
            rows = group["index"].astype(int).to_numpy()
            mask = np.zeros(len(typed), dtype=bool)
            mask[rows] = True
            text = pd.Series("", index=typed.index, dtype=object)
            text.iloc[rows] = [_describe_failure(column, value) for value in group["failure_case"]]
            failures.add(mask, text)


def _describe_failure(column: str, value: object) -> str:
    if column in FEATURE_RANGES:
        low, high = FEATURE_RANGES[column]
        return f"{column}: out of plausible range [{low:g}, {high:g}] (got {value})"
    if column == LABEL:
        return f"{LABEL}: must be 'malignant' or 'benign' (got '{str(value)[:40]}')"
    if column == SITE:
        return f"{SITE}: not a valid site id (got '{str(value)[:40]}')"
    return f"{column}: failed the schema"


def row_keys(frame: pd.DataFrame) -> np.ndarray:
    """A content hash per row over the contract's columns, to find duplicate rows."""
    return pd.util.hash_pandas_object(frame[list(DATA_COLUMNS)], index=False).to_numpy()


def validate_batch(
    raw: pd.DataFrame, site_id: str | None = None, existing_keys: np.ndarray | None = None
) -> ValidationResult:
    """Split a raw text batch into typed accepted rows and rejected rows with one reason each.

    ``site_id`` fills rows that name no site; ``existing_keys`` (from :func:`row_keys` of the
    current data version) turns rows already in the registry into rejects rather than repeats.
    Raises :class:`BatchRejected` when the batch's columns make every row unusable.
    """
    check_columns(raw, site_id)
    raw = raw.reset_index(drop=True)
    failures = _Failures(len(raw))
    typed = _typed_features(raw, failures)
    labels = raw[LABEL].astype("string").str.strip().str.lower()
    sites = (
        raw[SITE].astype("string").str.strip()
        if SITE in raw.columns
        else pd.Series(pd.NA, index=raw.index, dtype="string")
    )
    if site_id is not None:
        sites = sites.mask(sites.isna() | sites.eq(""), site_id)
    labels = labels.mask(labels.eq(""), pd.NA)
    sites = sites.mask(sites.eq(""), pd.NA)
    failures.add(labels.isna().to_numpy(), f"{LABEL}: missing value")
    failures.add(sites.isna().to_numpy(), f"{SITE}: missing value")
    typed[LABEL] = labels.astype(object)
    typed[SITE] = sites.astype(object)
    _schema_failures(typed, failures)
    reason = failures.reasons()

    ok = reason.eq("").to_numpy()
    keys = row_keys(typed)
    repeated = pd.Series(keys).duplicated(keep="first").to_numpy() & ok
    reason[repeated] = "duplicate of an earlier row in this batch"
    if existing_keys is not None and len(existing_keys):
        known = np.isin(keys, existing_keys) & ok & ~repeated
        reason[known] = "duplicate of a row already in the data registry"
    ok = reason.eq("").to_numpy()

    accepted = typed.loc[ok, list(DATA_COLUMNS)].reset_index(drop=True)
    accepted[LABEL] = accepted[LABEL].astype(str)
    accepted[SITE] = accepted[SITE].astype(str)
    rejected = raw.loc[~ok].copy()
    rejected.insert(0, ROW_NUMBER, rejected.index + 2)  # the header is line 1 of the file
    rejected[REASON] = reason[~ok].to_numpy()
    return ValidationResult(accepted=accepted, rejected=rejected.reset_index(drop=True))
