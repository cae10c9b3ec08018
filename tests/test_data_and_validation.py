"""The seed, the data contract and batch validation on small in-memory frames."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from pipelines.data import read_data_dir, seed_frame, write_seed
from pipelines.schema import DATA_COLUMNS, FEATURE_RANGES, FEATURES, LABEL, SITE
from pipelines.validate import BatchRejected, read_batch, validate_batch

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_seed_is_the_breast_cancer_data_with_malignant_spelled_out():
    frame = seed_frame()
    assert list(frame.columns) == list(DATA_COLUMNS)
    assert len(frame) == 569
    # scikit-learn codes malignant as 0: 212 malignant, 357 benign.
    assert frame[LABEL].value_counts().to_dict() == {"benign": 357, "malignant": 212}
    assert set(frame[SITE]) == {"site-a", "site-b", "site-c"}
    for name, (low, high) in FEATURE_RANGES.items():
        assert frame[name].between(low, high).all(), name


def test_seed_hash_matches_data_dvc(tmp_path: Path):
    """Regenerate the seed and let DVC hash it: it must be what data.dvc in the repo pins."""
    write_seed(tmp_path / "data")
    dvc = str(Path(sys.executable).parent / "dvc")
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    subprocess.run([dvc, "add", "data", "-q"], cwd=tmp_path, check=True)
    regenerated = yaml.safe_load((tmp_path / "data.dvc").read_text())["outs"][0]
    committed = yaml.safe_load((REPO_ROOT / "data.dvc").read_text())["outs"][0]
    assert regenerated["md5"] == committed["md5"]
    assert regenerated["size"] == committed["size"]


def test_read_data_dir_round_trips_the_seed(tmp_path: Path):
    write_seed(tmp_path)
    frame = read_data_dir(tmp_path)
    pd.testing.assert_frame_equal(frame, seed_frame(), check_dtype=False)


def _batch(tmp_path: Path, frame: pd.DataFrame, name: str = "batch.csv") -> pd.DataFrame:
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return read_batch(path)


def test_clean_batch_is_accepted_whole(tmp_path: Path):
    result = validate_batch(_batch(tmp_path, seed_frame().head(50)))
    assert len(result.accepted) == 50 and len(result.rejected) == 0
    assert result.accepted[list(FEATURES)].dtypes.eq("float64").all()


@pytest.mark.parametrize(
    ("column", "value", "reason"),
    [
        ("mean_radius", "abc", "mean_radius: not a number (got 'abc')"),
        ("mean_area", "", "mean_area: missing value"),
        ("mean_radius", "14200", "mean_radius: out of plausible range [0, 60] (got 14200.0)"),  # micrometres
        ("worst_area", "inf", "worst_area: not a finite number"),
        ("mean_texture", "-3", "mean_texture: out of plausible range"),
        ("diagnosis", "maybe", "diagnosis: must be 'malignant' or 'benign'"),
        ("site_id", "", "site_id: missing value"),
    ],
)
def test_each_bad_value_is_rejected_with_its_reason(tmp_path: Path, column: str, value: str, reason: str):
    frame = seed_frame().head(20).astype(str)
    frame.loc[7, column] = value
    result = validate_batch(_batch(tmp_path, frame))
    assert len(result.accepted) == 19
    assert len(result.rejected) == 1
    assert result.rejected.loc[0, "row_number"] == 9  # header is line 1, row index 7 is line 9
    assert reason in result.rejected.loc[0, "reason"]
    assert result.received == 20


def test_several_problems_in_one_row_are_all_named(tmp_path: Path):
    frame = seed_frame().head(5).astype(str)
    frame.loc[2, "mean_radius"] = "x"
    frame.loc[2, "mean_area"] = "99999"
    result = validate_batch(_batch(tmp_path, frame))
    reason = result.rejected.loc[0, "reason"]
    assert "mean_radius: not a number" in reason and "mean_area: out of plausible range" in reason


def test_duplicates_within_batch_and_against_registry(tmp_path: Path):
    from pipelines.validate import row_keys

    frame = seed_frame().head(10)
    batch = pd.concat([frame, frame.iloc[[3]]], ignore_index=True)
    result = validate_batch(_batch(tmp_path, batch))
    assert len(result.accepted) == 10
    assert list(result.rejected["reason"]) == ["duplicate of an earlier row in this batch"]

    known = row_keys(seed_frame().head(4))
    result = validate_batch(_batch(tmp_path, frame), existing_keys=known)
    assert len(result.accepted) == 6
    assert set(result.rejected["reason"]) == {"duplicate of a row already in the data registry"}


def test_site_option_fills_rows_without_site(tmp_path: Path):
    frame = seed_frame().head(5).drop(columns=[SITE])
    with pytest.raises(BatchRejected, match="missing required column"):
        validate_batch(_batch(tmp_path, frame))
    result = validate_batch(_batch(tmp_path, frame), site_id="site-z")
    assert set(result.accepted[SITE]) == {"site-z"}


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "empty file"),
        (bytes(range(256)) * 4, "binary content"),
        (b"\xff\xfe" + "mean_radius,é".encode("utf-16-le") + b"\n1,2\n", "not"),
    ],
)
def test_unreadable_files_are_rejected_whole(tmp_path: Path, content: bytes, reason: str):
    path = tmp_path / "landed.csv"
    path.write_bytes(content)
    with pytest.raises(BatchRejected, match=reason):
        validate_batch(read_batch(path))


def test_unknown_column_rejects_the_batch_without_echoing_values(tmp_path: Path):
    frame = seed_frame().head(5)
    frame["patient_name"] = "Jane Roe"
    with pytest.raises(BatchRejected) as error:
        validate_batch(_batch(tmp_path, frame))
    assert "patient_name" in str(error.value)
    assert "Jane" not in str(error.value)


def test_missing_column_and_no_usable_column(tmp_path: Path):
    with pytest.raises(BatchRejected, match="missing required column.*mean_radius"):
        validate_batch(_batch(tmp_path, seed_frame().head(5).drop(columns=["mean_radius"])))
    with pytest.raises(BatchRejected, match="no usable column"):
        validate_batch(_batch(tmp_path, pd.DataFrame({"foo": [1, 2]})))


def test_counts_always_add_up_on_a_messy_batch(tmp_path: Path):
    rng = np.random.default_rng(0)
    frame = seed_frame().sample(200, random_state=1).reset_index(drop=True).astype(str)
    for _ in range(60):
        row, column = rng.integers(0, 200), rng.choice(list(DATA_COLUMNS))
        frame.loc[row, column] = rng.choice(["", "n/a", "1e9", "-1", "benign?"])
    frame = pd.concat([frame, frame.head(15)], ignore_index=True)
    result = validate_batch(_batch(tmp_path, frame))
    assert len(result.accepted) + len(result.rejected) == len(frame)
    assert result.rejected["reason"].str.len().gt(0).all()


def test_vectorised_checks_agree_with_the_pandera_schema():
    """validate_batch checks ranges, labels and sites with numpy; pandera must find the same rows."""
    import pandera.errors

    from pipelines.validate import pandera_schema

    rng = np.random.default_rng(7)
    frame = seed_frame().sample(3000, replace=True, random_state=3).reset_index(drop=True)
    frame[list(FEATURES)] += rng.normal(0, 1e-6, (len(frame), len(FEATURES)))  # no accidental duplicates
    frame[list(FEATURES)] = frame[list(FEATURES)].abs()
    for _ in range(150):
        row, name = int(rng.integers(len(frame))), str(rng.choice(list(FEATURES)))
        low, high = FEATURE_RANGES[name]
        frame.loc[row, name] = rng.choice([low - 0.001, high + 0.001, high * 10, low, high])  # edges pass
    frame.loc[rng.integers(len(frame), size=40), LABEL] = rng.choice(["maybe", "malignant", "b"], size=40)
    frame.loc[rng.integers(len(frame), size=40), SITE] = rng.choice(["-bad", "site x", "ok.site_1"], size=40)

    result = validate_batch(frame)
    schema_reasons = ("out of plausible range", "must be 'malignant' or 'benign'", "not a valid site id")
    ours = set(result.rejected.loc[result.rejected["reason"].str.contains("|".join(schema_reasons)), "row_number"] - 2)
    with pytest.raises(pandera.errors.SchemaErrors) as errors:
        pandera_schema().validate(frame, lazy=True)
    theirs = set(errors.value.failure_cases["index"].dropna().astype(int))
    assert ours == theirs
    assert len(ours) > 100
    assert len(result.accepted) + len(result.rejected) == len(frame)


def test_text_is_normalised_once_per_distinct_value(tmp_path: Path):
    frame = seed_frame().head(6).astype(str)
    frame[LABEL] = [" Malignant", "BENIGN ", "benign", "", "Benign", "malignant"]
    frame[SITE] = ["site-a", " site-a ", "", "site-b", "bad site", "site-b"]
    result = validate_batch(_batch(tmp_path, frame), site_id="site-z")
    assert list(result.accepted[LABEL]) == ["malignant", "benign", "benign", "malignant"]
    assert list(result.accepted[SITE]) == ["site-a", "site-a", "site-z", "site-b"]
    reasons = ["diagnosis: missing value", "site_id: not a valid site id (got 'bad site')"]
    assert list(result.rejected["reason"]) == reasons
    assert list(result.rejected["row_number"]) == [5, 6]
    assert result.accepted[LABEL].map(type).eq(str).all() and result.accepted[SITE].map(type).eq(str).all()


def test_mixed_number_and_text_column_is_read_and_judged_per_value(tmp_path: Path):
    """The C parser reads a long column in chunks: some chunks floats, one text. Both must work."""
    frame = seed_frame().sample(200_000, replace=True, random_state=5).reset_index(drop=True)
    frame["mean_radius"] += np.random.default_rng(5).normal(0, 1e-6, len(frame))
    frame["mean_radius"] = frame["mean_radius"].abs()
    texture = frame["mean_texture"].astype(object)
    texture.iloc[-3:] = [" 12.5 ", "n/a", ""]
    frame["mean_texture"] = texture
    raw = _batch(tmp_path, frame)
    assert set(raw["mean_texture"].map(type)) == {float, str}  # the case this test is about
    result = validate_batch(raw)
    assert list(result.rejected["reason"]) == ["mean_texture: not a number (got 'n/a')", "mean_texture: missing value"]
    assert result.accepted["mean_texture"].iloc[-1] == 12.5
    assert len(result.accepted) == len(frame) - 2


def test_a_first_row_longer_than_the_header_rejects_the_batch(tmp_path: Path):
    """pandas would take the extra field for an index and shift every value one column left."""
    frame = seed_frame().head(3)
    path = tmp_path / "landed.csv"
    frame.to_csv(path, index=False)
    lines = path.read_text().splitlines()
    lines[1] += ",extra"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(BatchRejected, match="more fields than the header"):
        read_batch(path)


def _tricky_frame(rng: np.random.Generator, n: int = 4000) -> pd.DataFrame:
    """Floats at every magnitude and precision %g can meet, missing values, zeros of both signs."""
    magnitude = 10.0 ** rng.integers(-9, 13, size=(n, len(FEATURES)))
    values = rng.random((n, len(FEATURES))) * magnitude
    digits = rng.integers(0, 16, size=values.shape)
    for decimals in range(12):  # short and long decimals; digits of 12 and more keep full precision
        values = np.where(digits == decimals, np.round(values, decimals), values)
    values[rng.random(values.shape) < 0.02] = np.nan
    values[rng.random(values.shape) < 0.02] = 0.0
    values[rng.random(values.shape) < 0.01] = -0.0
    values[rng.random(values.shape) < 0.01] *= -1
    frame = pd.DataFrame(values, columns=list(FEATURES))
    frame[LABEL] = pd.array(rng.choice(["malignant", "benign", None], size=n), dtype="string")
    frame[SITE] = rng.choice(["site-a", "site_b.2"], size=n).astype(object)
    return frame


@pytest.mark.parametrize("awkward_text", [None, "site, with comma", 'say "hi"', 7])
def test_write_frame_writes_exactly_what_pandas_would(tmp_path: Path, awkward_text: object):
    """The registry's CSV bytes (and so DVC hashes) must not depend on how write_frame is implemented."""
    from pipelines.data import FLOAT_FORMAT, write_frame

    frame = _tricky_frame(np.random.default_rng(11))
    if awkward_text is not None:
        frame.loc[5, SITE] = awkward_text
    write_frame(frame, tmp_path / "ours.csv")
    expected = tmp_path / "pandas.csv"
    frame[list(DATA_COLUMNS)].to_csv(expected, index=False, float_format=FLOAT_FORMAT, lineterminator="\n")
    assert (tmp_path / "ours.csv").read_bytes() == expected.read_bytes()
    assert not list(tmp_path.glob("*.partial"))


def test_float_text_matches_percent_g_at_every_digit_count_and_power_of_ten_edge():
    from pipelines.data import FLOAT_FORMAT, _float_texts

    rng = np.random.default_rng(5)
    decimals = [
        f"{rng.integers(1, 10)}{''.join(map(str, rng.integers(0, 10, k - 1)))}e{exponent - k + 1}"
        for k in range(1, 18)
        for exponent in range(-6, 12)
        for _ in range(20)
    ]
    mantissas = ("1", "9.999999999", "9.9999999999")
    edges = [f"{sign}{m}e{p}" for sign in ("", "-") for p in range(-6, 12) for m in mantissas]
    values = np.array([float(text) for text in decimals + edges])
    values = np.concatenate([values, np.nextafter(values, np.inf), np.nextafter(values, -np.inf)])
    assert _float_texts(values).to_pylist() == [FLOAT_FORMAT % value for value in values.tolist()]
