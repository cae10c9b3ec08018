"""The prediction log: exact file format, hashed encounter ids, group-committed writes, readers."""

from __future__ import annotations

import os
import threading
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest

from medops.core.settings import Settings
from pipelines.prediction_log import (
    FEEDBACK_COLUMNS,
    PREDICTION_COLUMNS,
    SMOKE_TEST_SITE,
    PredictionLogWriter,
    hash_encounter_id,
    label_predictions,
    log_refusal,
    read_feedback,
    read_predictions,
    read_refusals,
)
from pipelines.schema import FEATURES


def _log(writer: PredictionLogWriter, n: int, *, request_id: str, site: str = "site-a", encounter: str | None = None):
    _ticket(writer, n, request_id=request_id, site=site, encounter=encounter)
    return _rows(n)


def _rows(n: int):
    X = np.arange(n * len(FEATURES), dtype=float).reshape(n, len(FEATURES)) / 7
    return X, np.linspace(0.1, 0.9, n)


def _ticket(writer: PredictionLogWriter, n: int, *, request_id: str, site: str = "site-a", encounter=None) -> int:
    X, probabilities = _rows(n)
    return writer.log_predictions(
        request_id=request_id,
        model_name="breast_cancer_diagnosis",
        model_version="3",
        site_ids=[site] * n,
        encounter_ids=[encounter] * n,
        features=X,
        probabilities=probabilities,
        labels=["malignant" if p >= 0.3 else "benign" for p in probabilities],
    )


def test_file_layout_columns_and_header_once(medops_home: Settings):
    writer = PredictionLogWriter(medops_home)
    _log(writer, 2, request_id="r1", encounter="enc-1")
    _log(writer, 3, request_id="r2")
    writer.close()
    day = datetime.now(UTC).strftime("%Y%m%d")
    path = medops_home.predictions_dir / "log" / f"predictions-{day}-{os.getpid()}.csv"
    lines = path.read_text().splitlines()
    assert lines[0].split(",") == list(PREDICTION_COLUMNS)
    assert PREDICTION_COLUMNS[:6] == (
        "logged_at",
        "request_id",
        "model_name",
        "model_version",
        "site_id",
        "encounter_hash",
    )
    assert PREDICTION_COLUMNS[6:36] == FEATURES and PREDICTION_COLUMNS[36:] == ("probability_malignant", "label")
    assert len(lines) == 1 + 5 and sum(line.startswith("logged_at") for line in lines) == 1
    assert "enc-1" not in path.read_text()  # never the raw identifier


def test_read_predictions_round_trip_and_hash(medops_home: Settings):
    writer = PredictionLogWriter(medops_home)
    X, probabilities = _log(writer, 4, request_id="r1", encounter="enc-42")
    _log(writer, 1, request_id="r2")
    writer.close()
    frame = read_predictions(medops_home)
    assert list(frame.columns) == list(PREDICTION_COLUMNS)
    assert len(frame) == 5
    first = frame[frame["request_id"] == "r1"]
    # written exactly (repr); pandas' fast parser reads them back to within an ulp
    np.testing.assert_allclose(first[list(FEATURES)].to_numpy(), X, rtol=1e-15, atol=0)
    np.testing.assert_allclose(first["probability_malignant"].to_numpy(), probabilities, rtol=1e-15, atol=0)
    assert set(first["encounter_hash"]) == {hash_encounter_id("enc-42", medops_home)}
    assert len(first["encounter_hash"].iloc[0]) == 64
    assert frame[frame["request_id"] == "r2"]["encounter_hash"].tolist() == [""]
    assert str(frame["logged_at"].dt.tz) == "UTC"
    assert frame["model_version"].tolist() == ["3"] * 5


def test_since_filter_and_smoke_tests_left_out(medops_home: Settings):
    writer = PredictionLogWriter(medops_home)
    _log(writer, 2, request_id="before")
    writer.close()
    cut = datetime.now(UTC)
    writer = PredictionLogWriter(medops_home)
    _log(writer, 3, request_id="after")
    _log(writer, 2, request_id="smoke", site=SMOKE_TEST_SITE)
    writer.close()
    assert set(read_predictions(medops_home, since=cut)["request_id"]) == {"after"}
    assert len(read_predictions(medops_home, since=cut, include_smoke_tests=True)) == 5
    assert read_predictions(medops_home, since=cut + timedelta(days=1)).empty
    assert len(read_predictions(medops_home)) == 5


def test_naive_bounds_are_read_as_utc_everywhere(medops_home: Settings, monkeypatch):
    """Times in the logs are UTC, so a naive ``since``/``until`` means UTC for the day files picked and
    for the rows kept alike, whatever the server's own time zone."""
    import time

    monkeypatch.setenv("TZ", "Pacific/Kiritimati")  # UTC+14: local midnight is the previous UTC day
    time.tzset()
    try:
        day = datetime(2026, 3, 10, 12, tzinfo=UTC)
        for hours in (-13, 1, 13):  # 23:00 the day before, 13:00, and 01:00 the day after
            log_refusal(
                medops_home,
                [("site-a", "radius_mean", "missing", 1, 1)],
                now=(day + timedelta(hours=hours)).timestamp(),
            )
        naive_since, naive_until = datetime(2026, 3, 10, 0, 0), datetime(2026, 3, 11, 0, 0)
        kept = read_refusals(medops_home, since=naive_since, until=naive_until)
        aware = read_refusals(medops_home, since=naive_since.replace(tzinfo=UTC), until=naive_until.replace(tzinfo=UTC))
        assert kept["logged_at"].tolist() == aware["logged_at"].tolist() == [pd.Timestamp(day + timedelta(hours=1))]
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_empty_log_reads_as_empty_frame(medops_home: Settings):
    frame = read_predictions(medops_home)
    assert frame.empty and list(frame.columns) == list(PREDICTION_COLUMNS)
    assert read_feedback(medops_home).empty


def test_feedback_is_hashed_and_readable(medops_home: Settings):
    writer = PredictionLogWriter(medops_home)
    assert writer.log_feedback([("enc-1", "malignant"), ("enc-2", "benign")]) == 2
    writer.close()
    feedback = read_feedback(medops_home)
    assert list(feedback.columns) == list(FEEDBACK_COLUMNS)
    assert feedback["encounter_hash"].tolist() == [hash_encounter_id(e, medops_home) for e in ("enc-1", "enc-2")]
    assert feedback["diagnosis"].tolist() == ["malignant", "benign"]
    text = "".join(p.read_text() for p in (medops_home.predictions_dir / "feedback").glob("*.csv"))
    assert "enc-1" not in text


def test_concurrent_writers_lose_and_tear_nothing(medops_home: Settings):
    writer = PredictionLogWriter(medops_home)
    threads = [
        threading.Thread(target=lambda i=i: [_log(writer, 1 + (j % 3), request_id=f"t{i}-{j}") for j in range(50)])
        for i in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    writer.close()
    frame = read_predictions(medops_home)
    expected = 8 * sum(1 + (j % 3) for j in range(50))
    assert len(frame) == expected
    assert frame.groupby("request_id").size().sum() == expected
    assert frame["probability_malignant"].notna().all()


def test_torn_last_line_is_skipped(medops_home: Settings):
    writer = PredictionLogWriter(medops_home)
    _log(writer, 2, request_id="ok")
    writer.close()
    path = next((medops_home.predictions_dir / "log").glob("*.csv"))
    with path.open("a") as handle:
        handle.write("2026-01-01T00:00:00+00:00,torn,breast_cancer_diagnosis,3,site-a,,1.0,2.0")
    assert read_predictions(medops_home)["request_id"].tolist() == ["ok", "ok"]


def test_an_answer_waits_for_the_fsync_that_covers_its_rows(medops_home: Settings, monkeypatch):
    """wait_durable returns only after an fsync that started after the rows were written."""
    import asyncio

    from pipelines import prediction_log

    synced_at: list[int] = []
    real_fsync = os.fsync
    writer = PredictionLogWriter(medops_home)

    def counting_fsync(fd: int) -> None:
        synced_at.append(writer._written)  # tickets handed out when the fsync started
        real_fsync(fd)

    monkeypatch.setattr(prediction_log.os, "fsync", counting_fsync)

    async def serve_one() -> int:
        ticket = _ticket(writer, 3, request_id="r1")
        await writer.wait_durable(ticket)
        return ticket

    ticket = asyncio.run(serve_one())
    assert any(count >= ticket for count in synced_at)
    writer.close()


def test_a_failed_fsync_refuses_every_waiting_and_later_request(medops_home: Settings, monkeypatch):
    import asyncio

    from pipelines import prediction_log
    from pipelines.prediction_log import PredictionLogFailed

    writer = PredictionLogWriter(medops_home)
    _log(writer, 1, request_id="before")  # opens the file (its header is fsynced on create)

    def broken_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(prediction_log.os, "fsync", broken_fsync)

    async def serve_one() -> None:
        await writer.wait_durable(_ticket(writer, 2, request_id="lost"))

    # refused whether the fsync failed while it waited or just before it asked to wait
    with pytest.raises(PredictionLogFailed, match="Input/output error"):
        asyncio.run(serve_one())
    assert not writer.healthy
    with pytest.raises(PredictionLogFailed):
        _log(writer, 1, request_id="after")
    with pytest.raises(PredictionLogFailed):
        writer.log_feedback([("enc-1", "benign")])


def test_a_torn_row_is_moved_aside_before_the_file_is_appended_to_again(medops_home: Settings):
    from pipelines.prediction_log import repair_torn_tail

    writer = PredictionLogWriter(medops_home)
    _log(writer, 2, request_id="ok")
    writer.close()
    path = next((medops_home.predictions_dir / "log").glob("*.csv"))
    torn = "2026-01-01T00:00:00+00:00,torn,breast_cancer_diagnosis,3,site-a,,1.0,2.0"
    with path.open("a") as handle:
        handle.write(torn)
    writer = PredictionLogWriter(medops_home)  # same pid, same day: the same file is reopened
    _log(writer, 1, request_id="next")
    writer.close()
    assert read_predictions(medops_home)["request_id"].tolist() == ["ok", "ok", "next"]
    assert path.read_bytes().endswith(b"\n") and b"torn" not in path.read_bytes()
    assert path.with_name(path.name + ".torn").read_text() == torn + "\n"
    assert repair_torn_tail(path) == 0


def test_label_predictions_joins_the_latest_prediction_and_label_per_encounter():
    at = pd.to_datetime(["2026-01-01T10:00", "2026-01-01T11:00", "2026-01-01T09:00", "2026-01-01T12:00"], utc=True)
    predictions = pd.DataFrame(
        {
            "logged_at": at,
            "encounter_hash": ["h1", "h1", "h2", ""],
            "mean_radius": [10.0, 11.0, 20.0, 30.0],
            "probability_malignant": [0.2, 0.7, 0.9, 0.5],
            "label": ["benign", "malignant", "malignant", "benign"],
        }
    )
    feedback = pd.DataFrame(
        {
            "logged_at": pd.to_datetime(["2026-01-02", "2026-01-01", "2026-01-03", "2026-01-02"], utc=True),
            "encounter_hash": ["h2", "h2", "h3", ""],
            "diagnosis": ["benign", "malignant", "malignant", "malignant"],
        }
    )
    joined = label_predictions(predictions.sample(frac=1, random_state=0), feedback)
    # h1 has no label, h3 no prediction, "" is no encounter; h2's correction (logged later) wins
    assert joined[["encounter_hash", "mean_radius", "label", "diagnosis"]].values.tolist() == [
        ["h2", 20.0, "malignant", "benign"]
    ]
    feedback.loc[2, "encounter_hash"] = "h1"
    joined = label_predictions(predictions, feedback).set_index("encounter_hash")
    assert joined.loc["h1", "probability_malignant"] == 0.7  # the re-scored prediction, not the first
    assert sorted(joined.index) == ["h1", "h2"]


def test_label_predictions_names_what_is_missing():
    with pytest.raises(ValueError, match="feedback lack the column.*diagnosis"):
        label_predictions(pd.DataFrame({"encounter_hash": []}), pd.DataFrame({"encounter_hash": []}))
