"""The stable hold-out: a row's side depends on the row alone, across growing data versions."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipelines.data import read_data_dir, seed_frame, write_frame
from pipelines.holdout import (
    describe_holdout,
    holdout_fingerprint,
    row_keys,
    split_by_row_key,
)
from pipelines.schema import FEATURES, LABEL, POSITIVE, SITE


def _new_rows(n: int, seed: int, site: str) -> pd.DataFrame:
    """Plausible new cases from a new site: seed rows with 3 % measurement noise, six decimals."""
    rng = np.random.default_rng(seed)
    base = seed_frame()
    rows = base.iloc[rng.integers(0, len(base), size=n)].reset_index(drop=True)
    rows[list(FEATURES)] = np.round(rows[list(FEATURES)].to_numpy() * rng.normal(1.0, 0.03, (n, len(FEATURES))), 6)
    rows[SITE] = site
    return rows


def _keys(frame: pd.DataFrame) -> set[str]:
    return set(row_keys(frame).tolist())


@pytest.fixture(scope="module")
def versions() -> list[pd.DataFrame]:
    """Three data versions as the registry grows them: the seed, then two batches appended."""
    v1 = seed_frame()
    v2 = pd.concat([v1, _new_rows(400, seed=1, site="site-d")], ignore_index=True)
    v3 = pd.concat([v2, _new_rows(700, seed=2, site="site-e")], ignore_index=True)
    return [v1, v2, v3]


def test_a_row_keeps_its_side_across_three_growing_versions(versions: list[pd.DataFrame]):
    splits = [split_by_row_key(frame) for frame in versions]
    for (train_old, holdout_old), (train_new, holdout_new) in zip(splits, splits[1:], strict=False):
        assert _keys(holdout_old) <= _keys(holdout_new)
        assert _keys(train_old) <= _keys(train_new)
    # so no version's champion trained on a row a later candidate is compared on
    for train, _ in splits:
        for _, holdout in splits:
            assert not _keys(train) & _keys(holdout)


def test_no_row_is_both_trained_on_and_held_out(versions: list[pd.DataFrame]):
    for frame in versions:
        train, holdout = split_by_row_key(frame)
        assert len(train) + len(holdout) == len(frame)
        assert not _keys(train) & _keys(holdout)
        assert _keys(train) | _keys(holdout) == _keys(frame)


def test_the_side_does_not_depend_on_row_order_or_neighbours():
    frame = seed_frame()
    _, holdout = split_by_row_key(frame)
    shuffled = frame.sample(frac=1.0, random_state=7).reset_index(drop=True)
    _, holdout_shuffled = split_by_row_key(shuffled)
    half = frame.iloc[::2].reset_index(drop=True)
    _, holdout_half = split_by_row_key(half)
    assert holdout_fingerprint(holdout_shuffled) == holdout_fingerprint(holdout)
    assert _keys(holdout_half) == _keys(holdout) & _keys(half)


def test_share_is_roughly_respected_and_a_larger_share_only_adds_rows(versions: list[pd.DataFrame]):
    frame = versions[-1]  # 1669 rows
    smaller = None
    for share in (0.1, 0.2, 0.3):
        _, holdout = split_by_row_key(frame, share)
        expected, spread = share * len(frame), np.sqrt(share * (1 - share) * len(frame))
        assert abs(len(holdout) - expected) < 4 * spread, (share, len(holdout))
        if smaller is not None:
            assert _keys(smaller) <= _keys(holdout)
        smaller = holdout


@pytest.mark.parametrize("share", [0.0, 1.0, -0.1, 1.5])
def test_a_share_outside_zero_and_one_is_refused(share: float):
    with pytest.raises(ValueError, match="share"):
        split_by_row_key(seed_frame(), share)


def test_the_key_is_the_sha256_of_the_row_as_the_registry_writes_it(tmp_path: Path):
    frame = seed_frame()
    path = write_frame(frame, tmp_path / "seed.csv")
    lines = path.read_bytes().split(b"\n")[1:-1]
    assert row_keys(frame).tolist() == [hashlib.sha256(line).hexdigest() for line in lines]
    # read back from the registry's text, every row has the key it had in memory
    assert (row_keys(read_data_dir(tmp_path)) == row_keys(frame)).all()


def test_any_change_to_a_row_changes_its_key():
    frame = seed_frame().head(3)
    keys = row_keys(frame)
    for column, value in (("mean_radius", 17.990001), (LABEL, "benign"), (SITE, "site-z")):
        changed = frame.copy()
        changed.loc[0, column] = value
        assert row_keys(changed)[0] != keys[0]
        assert (row_keys(changed)[1:] == keys[1:]).all()


def test_fingerprint_names_the_rows_not_their_order():
    _, holdout = split_by_row_key(seed_frame())
    size, digest = holdout_fingerprint(holdout)
    assert size == len(holdout)
    assert digest == hashlib.sha256("\n".join(sorted(row_keys(holdout).tolist())).encode()).hexdigest()
    assert holdout_fingerprint(holdout.iloc[::-1]) == (size, digest)
    assert holdout_fingerprint(holdout.iloc[1:]).sha256 != digest


def test_the_seeds_holdout_is_not_stratified_but_has_a_sane_class_balance():
    """Not stratified (a row's side must not depend on its neighbours), so the balance is reported.

    The seed has 212 malignant rows of 569 (37 %); the hash hold-out of 20 % should hold about 42
    of them. Three binomial standard deviations either way is what "sane" means here, and every
    seed site has at least ten malignant rows so that it can be judged on its own.
    """
    frame = seed_frame()
    _, holdout = split_by_row_key(frame)
    summary = describe_holdout(holdout)
    assert summary.rows == len(holdout) and summary.malignant + summary.benign == summary.rows
    assert (
        0.2 * len(frame) - 3 * np.sqrt(0.16 * len(frame))
        < summary.rows
        < 0.2 * len(frame) + 3 * np.sqrt(0.16 * len(frame))
    )
    share = (frame[LABEL] == POSITIVE).mean()
    expected = share * summary.rows
    spread = np.sqrt(summary.rows * share * (1 - share))
    assert abs(summary.malignant - expected) < 3 * spread, summary.to_dict()
    assert set(summary.sites) == {"site-a", "site-b", "site-c"}
    assert all(site["malignant"] >= 10 for site in summary.sites.values()), summary.sites
    assert sum(site["rows"] for site in summary.sites.values()) == summary.rows
    assert summary.to_dict()["malignant_share"] == pytest.approx(summary.malignant / summary.rows)


def test_rows_that_could_not_be_in_a_data_version_are_refused():
    frame = seed_frame().head(2)
    frame.loc[0, SITE] = "site,a"
    with pytest.raises(ValueError, match="site_id: text with a comma"):
        row_keys(frame)
    with pytest.raises(ValueError, match="lack the contract column"):
        row_keys(seed_frame().drop(columns=[SITE]))
