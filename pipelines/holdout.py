"""A hold-out that stays put as data grows: each row's side is decided by a hash of the row alone.

A row's key is the SHA-256 of its canonical CSV line as the data registry writes it, so a row read
back from any data version, on any machine and pandas version, has the same key; a row is held out
when the first eight bytes of its key, as a fraction of 2**64, fall below the share. A row held
out once stays held out in every later version, so a candidate and its champion are compared on
rows neither trained on, and a larger share only adds rows to the hold-out. The split is
deliberately not stratified by diagnosis or site, because stratifying would make a row's side
depend on its neighbours; class and site balance are reported (:func:`describe_holdout`) instead.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from pipelines.schema import DATA_COLUMNS, LABEL, POSITIVE, SITE

if TYPE_CHECKING:
    import pandas as pd

DEFAULT_SHARE = 0.2


class HoldoutFingerprint(NamedTuple):
    """Size of a hold-out and the SHA-256 of its sorted row keys (one hex key per line)."""

    size: int
    sha256: str


@dataclass(frozen=True)
class HoldoutSummary:
    """What a data version's hold-out holds: size, fingerprint, class balance overall and per site."""

    rows: int
    sha256: str
    malignant: int
    benign: int
    sites: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"malignant_share": self.malignant / self.rows if self.rows else float("nan")}


def canonical_lines(frame: pd.DataFrame) -> list[str]:
    """Each row as the data registry's CSV writes it (no line end), over the contract's columns.

    Uses the registry writer's own formatter, so a key cannot drift from the bytes in a data
    version: a test holds these lines equal to the lines :func:`pipelines.data.write_frame` writes.
    """
    import pyarrow.compute as pc

    from pipelines.data import _text_table  # the registry writer's own text: one definition of a row's bytes

    missing = [name for name in DATA_COLUMNS if name not in frame.columns]
    if missing:
        raise ValueError(f"rows lack the contract column(s) {', '.join(missing)}: cannot key them")
    table, needs_quotes = _text_table(frame[list(DATA_COLUMNS)])
    if needs_quotes:  # validation never lets such text into a data version
        raise ValueError(
            f"{LABEL} or {SITE}: text with a comma, quote or line break is not a valid contract row; validate it first"
        )
    joined = pc.binary_join_element_wise(
        *(table.column(name) for name in DATA_COLUMNS), ",", null_handling="replace", null_replacement=""
    )
    return joined.to_pylist()


def row_keys(frame: pd.DataFrame) -> np.ndarray:
    """The stable key of each row: SHA-256 (hex) of its canonical CSV line."""
    return np.array([hashlib.sha256(line.encode()).hexdigest() for line in canonical_lines(frame)], dtype="<U64")


def holdout_mask(keys: np.ndarray, share: float = DEFAULT_SHARE) -> np.ndarray:
    """Which keys are held out: the key's first 16 hex digits, as a fraction of 2**64, below ``share``."""
    if not 0.0 < share < 1.0:
        raise ValueError(f"share: the hold-out share must lie strictly between 0 and 1, got {share!r}")
    buckets = np.array([int(key[:16], 16) for key in keys], dtype=np.uint64)
    return buckets < np.uint64(int(share * 2**64))


def split_by_row_key(frame: pd.DataFrame, share: float = DEFAULT_SHARE) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training rows, hold-out rows) of a data version, each side decided by the row's own key.

    Row order within each side is the frame's, and each side's index is reset.
    """
    held_out = holdout_mask(row_keys(frame), share)
    return frame.loc[~held_out].reset_index(drop=True), frame.loc[held_out].reset_index(drop=True)


def holdout_fingerprint(holdout: pd.DataFrame) -> HoldoutFingerprint:
    """(size, SHA-256 of the sorted row keys joined by newlines): two hold-outs with the same rows agree."""
    keys = sorted(row_keys(holdout).tolist())
    return HoldoutFingerprint(len(keys), hashlib.sha256("\n".join(keys).encode()).hexdigest())


def describe_holdout(holdout: pd.DataFrame) -> HoldoutSummary:
    """Size, fingerprint and malignant/benign counts overall and per site, for the run and the model card.

    The split is not stratified, so these counts are what tells a reviewer whether a site has
    enough malignant hold-out rows to be judged on its own.
    """
    malignant = holdout[LABEL].to_numpy() == POSITIVE
    sites = holdout[SITE].astype(str).to_numpy()
    per_site = {
        site: {"rows": int((sites == site).sum()), "malignant": int((malignant & (sites == site)).sum())}
        for site in sorted(set(sites.tolist()))
    }
    size, digest = holdout_fingerprint(holdout)
    return HoldoutSummary(
        rows=size, sha256=digest, malignant=int(malignant.sum()), benign=int((~malignant).sum()), sites=per_site
    )
