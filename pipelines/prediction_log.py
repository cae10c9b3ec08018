"""The append-only prediction log and the feedback labels: written by the service, read by monitoring.

Every served prediction is one CSV row in ``predictions_dir/log/predictions-YYYYMMDD-<pid>.csv``
(one file per serving process and UTC day, so rows never interleave); ``/feedback`` labels go to
``predictions_dir/feedback/``. Encounter ids never reach the disk: only their keyed hash.

Durability: a request's rows are written with one ``write`` and fsynced by a group commit (one
``fsync`` covers every request of a few milliseconds); the service answers only once the commit
covering its rows is done. A failed write or fsync fails the writer: every waiting and later request
is refused (503, not ready) rather than answered unlogged. A row torn by a crash (never answered) is
moved to a ``.torn`` file beside the log when the file is next opened, so later rows never run into it.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.schema import FEATURES, LABEL, SITE

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from medops.core.settings import Settings

_ID_COLUMNS = ("request_id", "model_name", "model_version", SITE, "encounter_hash")
PREDICTION_COLUMNS: tuple[str, ...] = ("logged_at", *_ID_COLUMNS, *FEATURES, "probability_malignant", "label")
FEEDBACK_COLUMNS: tuple[str, ...] = ("logged_at", "encounter_hash", LABEL)
REFUSAL_COLUMNS: tuple[str, ...] = ("logged_at", SITE, "field", "reason", "count", "records")
"""One line per (site, field, reason) of a refused /predict request: ``count`` records named that
field for that reason; ``records`` is how many records the request brought from that site (on the
site's first line only, 0 on the others, so summing it counts each refused record once)."""
# site_id of the requests serving.rollout sends to check a new version before and after the switch
SMOKE_TEST_SITE = "medops-smoke-test"


def predictions_log_dir(settings: Settings) -> Path:
    return settings.predictions_dir / "log"


def feedback_dir(settings: Settings) -> Path:
    return settings.predictions_dir / "feedback"


def refusals_dir(settings: Settings) -> Path:
    return settings.predictions_dir / "refusals"


def _keyed_hash(key: bytes, encounter_id: str | None) -> str:
    return hmac.digest(key, encounter_id.encode(), hashlib.sha256).hex() if encounter_id else ""


def hash_encounter_id(encounter_id: str | None, settings: Settings) -> str:
    """The keyed hash (HMAC-SHA256, '' for no id) that stands for ``encounter_id`` in the log."""
    return _keyed_hash(settings.encounter_hash_key(), encounter_id)


def _utc_day(now: float) -> str:
    return time.strftime("%Y%m%d", time.gmtime(now))


class _DailyAppendFile:
    """An O_APPEND file per UTC day for this process, with the header written once per file."""

    def __init__(self, directory: Path, prefix: str, header: Sequence[str]) -> None:
        self.directory = directory
        self.prefix = prefix
        self.header = (",".join(header) + "\n").encode()
        self.fd: int | None = None
        self.day_ends = 0.0

    def fd_for(self, now: float) -> int:
        """The descriptor of ``now``'s day file; the previous day's is fsynced and closed first."""
        if self.fd is not None and now < self.day_ends:
            return self.fd
        self.close()
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{self.prefix}-{_utc_day(now)}-{os.getpid()}.csv"
        repair_torn_tail(path)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        if os.fstat(fd).st_size == 0:
            os.write(fd, self.header)
            os.fsync(fd)
            # the new directory entry must be durable too, or a crash could lose the whole file
            dir_fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        self.fd = fd
        self.day_ends = (now // 86400 + 1) * 86400  # next UTC midnight
        return fd

    def close(self) -> None:
        if self.fd is not None:
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = None


class PredictionLogFailed(OSError):
    """A write or fsync of the prediction log failed: nothing may be answered until a restart."""


def repair_torn_tail(path: Path) -> int:
    """Cut a torn last line (its writer died mid-write) off ``path`` into ``path.torn``; returns the bytes
    moved. Such a row was never answered (answers wait for the fsync): kept for forensics, not deleted."""
    size = path.stat().st_size if path.exists() else 0
    if size == 0:
        return 0
    with path.open("r+b") as handle:
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return 0
        tail_start = max(0, size - (1 << 20))
        handle.seek(tail_start)
        tail = handle.read()
        cut = tail_start + tail.rfind(b"\n") + 1 if b"\n" in tail else 0
        handle.seek(cut)
        fragment = handle.read()
        with path.with_name(path.name + ".torn").open("ab") as torn:
            torn.write(fragment + b"\n")
            torn.flush()
            os.fsync(torn.fileno())
        handle.truncate(cut)
        handle.flush()
        os.fsync(handle.fileno())
    return len(fragment)


class PredictionLogWriter:
    """Appends prediction rows for one serving process; fsyncs them in group commits.

    ``log_predictions`` writes a request's rows in one ``write`` (whole lines: concurrent requests never
    interleave) and returns a ticket; ``await wait_durable(ticket)`` returns once a commit covers it. A
    background thread fsyncs whenever there is unsynced data, so commits grow with the load and a lone
    request waits for one fsync, not a timer.
    """

    def __init__(self, settings: Settings) -> None:
        self._predictions = _DailyAppendFile(predictions_log_dir(settings), "predictions", PREDICTION_COLUMNS)
        self._feedback = _DailyAppendFile(feedback_dir(settings), "feedback", FEEDBACK_COLUMNS)
        self.hash_encounter = functools.partial(_keyed_hash, settings.encounter_hash_key())
        self.served = ServedEncounters(settings.served_index_size)
        self._lookback_days = settings.feedback_lookback_days
        self._lock = threading.Lock()
        self._dirty = threading.Event()
        self._closed = False
        self._written = 0  # tickets handed out
        self._durable = 0  # tickets covered by a finished fsync
        self._waiters: list[tuple[int, Any, Any]] = []  # (ticket, event loop, future)
        self.failure: OSError | None = None
        threading.Thread(target=self._commit_loop, name="prediction-log-commit", daemon=True).start()

    @property
    def healthy(self) -> bool:
        """False once a write or fsync failed: the service then reports not ready."""
        return self.failure is None and not self._closed

    def log_predictions(
        self,
        *,
        request_id: str,
        model_name: str,
        model_version: str,
        site_ids: Sequence[str],
        encounter_ids: Sequence[str | None],
        features: np.ndarray,
        probabilities: np.ndarray,
        labels: Sequence[str],
    ) -> int:
        """Append one row per record of a served request (all rows in one write); returns its ticket.

        orjson formats the numbers (shortest round-trip text, ten times faster than ``repr`` for 100
        records); ids and labels are plain tokens (``SITE_PATTERN``, hex), so nothing needs quoting.
        """
        import numpy as np
        import orjson

        now = time.time()
        lead = f"{datetime.fromtimestamp(now, UTC).isoformat()},{request_id},{model_name},{model_version},"
        numbers = orjson.dumps(np.column_stack((features, probabilities)), option=orjson.OPT_SERIALIZE_NUMPY)
        rows = numbers[2:-2].split(b"],[")  # "[[f1,..,f30,p],[...]]" -> "f1,..,f30,p" per record
        hashes = [self.hash_encounter(encounter) for encounter in encounter_ids]
        data = b"".join(
            [
                f"{lead}{site},{encounter_hash},".encode() + row + f",{label}\n".encode()
                for site, encounter_hash, row, label in zip(site_ids, hashes, rows, labels, strict=True)
            ]
        )
        with self._lock:
            self._write(self._predictions, data, now)
            self._written += 1
            ticket = self._written
        self._dirty.set()
        self.served.remember(site_ids, hashes)
        return ticket

    def unanswered(self, site: str | None, encounter_hashes: Sequence[str]) -> list[int]:
        """Positions of the encounters no prediction was logged for to ``site`` (None: any site but the
        smoke-test one) within the lookback: this worker's answers from memory, the rest from every
        worker's log files of the last ``feedback_lookback_days`` days (a read costing their size)."""
        missing = [i for i, digest in enumerate(encounter_hashes) if not self.served.answered(site, digest)]
        if not missing:
            return []
        wanted = {encounter_hashes[i] for i in missing if encounter_hashes[i]}
        since = datetime.fromtimestamp(time.time() - self._lookback_days * 86400, UTC)
        found = answered_in_log(self._predictions.directory, site, wanted, since) if wanted else {}
        self.served.remember([found[digest] for digest in found], list(found))
        return [i for i in missing if encounter_hashes[i] not in found]

    def log_feedback(self, labels: Iterable[tuple[str, str]]) -> int:
        """Append ``(encounter_id, diagnosis)`` pairs as hashed feedback rows, fsynced before return."""
        now = time.time()
        logged_at = datetime.fromtimestamp(now, UTC).isoformat()
        lines = [f"{logged_at},{self.hash_encounter(encounter)},{diagnosis}\n" for encounter, diagnosis in labels]
        with self._lock:
            self._write(self._feedback, "".join(lines).encode(), now, fsync=True)
        return len(lines)

    def _raise_if_failed(self) -> None:
        if self._closed:
            raise PredictionLogFailed("prediction log is closed")
        if self.failure is not None:
            raise PredictionLogFailed(f"prediction log failed earlier: {self.failure}")

    def _write(self, target: _DailyAppendFile, data: bytes, now: float, *, fsync: bool = False) -> None:
        """Write ``data`` whole (the caller holds the lock); a failure fails the writer for good."""
        self._raise_if_failed()
        try:
            fd = target.fd_for(now)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if fsync:
                os.fsync(fd)
        except OSError as error:
            self._fail(error)
            store = "feedback store" if target is self._feedback else "prediction log"
            raise PredictionLogFailed(f"{store} write failed: {error}") from error

    async def wait_durable(self, ticket: int, timeout: float = 10.0) -> None:
        """Return once the rows of ``ticket`` are fsynced; raise PredictionLogFailed if they cannot be."""
        import asyncio

        loop = asyncio.get_running_loop()
        with self._lock:
            if self._durable >= ticket:
                return
            self._raise_if_failed()
            future = loop.create_future()
            self._waiters.append((ticket, loop, future))
        try:
            await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise PredictionLogFailed(f"prediction log commit took longer than {timeout:.0f} s") from None

    def _fail(self, error: OSError) -> None:
        """Remember the failure (caller holds the lock) and release every waiter with it."""
        self.failure = self.failure or error
        waiters, self._waiters = self._waiters, []
        failure = PredictionLogFailed(f"prediction log fsync failed: {error}")
        for _, loop, future in waiters:
            loop.call_soon_threadsafe(_settle, future, failure)

    def _commit_loop(self) -> None:
        while not self._closed:
            self._dirty.wait()
            self._dirty.clear()
            self.commit()

    def commit(self) -> None:
        """fsync everything written so far and release the requests waiting for it."""
        with self._lock:
            fd, ticket = self._predictions.fd, self._written
        if fd is None or ticket == self._durable:
            return
        try:
            os.fsync(fd)
        except OSError as error:
            with self._lock:
                if self._predictions.fd == fd:
                    self._fail(error)
                    return
            # the day rolled over in between: fd_for fsynced and closed that file itself
        with self._lock:
            self._durable = max(self._durable, ticket)
            ready = [w for w in self._waiters if w[0] <= ticket]
            self._waiters = [w for w in self._waiters if w[0] > ticket]
        for _, loop, future in ready:
            loop.call_soon_threadsafe(_settle, future, None)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._predictions.close()
                self._feedback.close()
            except OSError as error:
                self._fail(error)
            else:
                self._durable = self._written
                waiters, self._waiters = self._waiters, []
                for _, loop, future in waiters:
                    loop.call_soon_threadsafe(_settle, future, None)
        self._dirty.set()


class ServedEncounters:
    """The (encounter hash -> site) of the latest ``capacity`` predictions this process logged, so that
    /feedback reaching the worker that answered need not read the log files. Guarded by a lock."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(capacity, 0)
        self._sites: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, site_ids: Sequence[str], encounter_hashes: Sequence[str]) -> None:
        if not self.capacity:
            return
        with self._lock:
            for site, digest in zip(site_ids, encounter_hashes, strict=True):
                if digest:
                    self._sites[digest] = site
                    self._sites.move_to_end(digest)
            while len(self._sites) > self.capacity:
                self._sites.popitem(last=False)

    def answered(self, site: str | None, encounter_hash: str) -> bool:
        """Whether ``encounter_hash`` was answered for ``site`` (None: for any site but the smoke-test one)."""
        answered_for = self._sites.get(encounter_hash) if encounter_hash else None
        if site is None:
            return answered_for is not None and answered_for != SMOKE_TEST_SITE
        return answered_for == site


def answered_in_log(directory: Path, site: str | None, encounter_hashes: set[str], since: datetime) -> dict[str, str]:
    """Which of ``encounter_hashes`` have a logged prediction for ``site`` (None: any site but the
    smoke-test one) in files of ``since``'s day or later, with the site each was answered for."""
    wanted = {digest.encode() for digest in encounter_hashes}
    site_bytes = site.encode() if site is not None else None
    smoke = SMOKE_TEST_SITE.encode()
    site_at, hash_at = PREDICTION_COLUMNS.index(SITE), PREDICTION_COLUMNS.index("encounter_hash")
    found: dict[bytes, bytes] = {}
    for path in reversed(_log_files(directory, "predictions", since)):  # newest first
        with path.open("rb") as handle:
            for line in handle:
                parts = line.split(b",", hash_at + 1)
                if len(parts) <= hash_at + 1 or parts[hash_at] not in wanted:
                    continue
                answered_for = parts[site_at]
                if answered_for == site_bytes or (site_bytes is None and answered_for != smoke):
                    found.setdefault(parts[hash_at], answered_for)
        if len(found) == len(wanted):
            break
    return {digest.decode(): answered_for.decode() for digest, answered_for in found.items()}


def _settle(future: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def _as_utc(moment: datetime) -> datetime:
    """``moment`` in UTC; a naive one is read as UTC, as every time in the logs is."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _log_files(directory: Path, prefix: str, since: datetime | None) -> list[Path]:
    files = sorted(directory.glob(f"{prefix}-*.csv"))
    if since is None:
        return files
    first_day = _as_utc(since).strftime("%Y%m%d")
    return [path for path in files if path.name.split("-")[1] >= first_day]


def _read_log(
    directory: Path, prefix: str, since: datetime | None, columns: tuple[str, ...], string_columns: tuple[str, ...]
) -> pd.DataFrame:
    """The rows of one log's files (of ``since``'s day or later), ``logged_at`` parsed as UTC, oldest first."""
    import pandas as pd

    frames = []
    for path in _log_files(directory, prefix, since):
        # a crash mid-write can leave a torn last line: skip it rather than fail the whole read
        frame = pd.read_csv(
            path,
            dtype={name: str for name in string_columns},
            keep_default_na=False,
            na_values={name: [""] for name in columns if name not in string_columns},
            on_bad_lines="skip",
            engine="c",
        )
        if tuple(frame.columns) != columns:
            raise ValueError(f"{path} has columns {list(frame.columns)}, expected {list(columns)}")
        frames.append(frame)
    if frames:
        frame = pd.concat(frames, ignore_index=True)
    else:
        frame = pd.DataFrame({name: pd.Series(dtype=str if name in string_columns else float) for name in columns})
    frame["logged_at"] = pd.to_datetime(frame["logged_at"], utc=True, format="ISO8601")
    return frame.sort_values("logged_at", kind="stable")


def read_predictions(
    settings: Settings, since: datetime | None = None, *, include_smoke_tests: bool = False
) -> pd.DataFrame:
    """Every logged prediction (optionally those logged at or after ``since``), oldest first.

    Columns are :data:`PREDICTION_COLUMNS`: ``logged_at`` in UTC, ids and labels as strings
    (``encounter_hash`` ``""`` without an encounter id), numbers as floats. The rollout's smoke-test
    requests (:data:`SMOKE_TEST_SITE`) are left out unless ``include_smoke_tests``: they are not patients.
    """
    import pandas as pd

    frame = _read_log(predictions_log_dir(settings), "predictions", since, PREDICTION_COLUMNS, (*_ID_COLUMNS, "label"))
    frame = frame.dropna(subset=["probability_malignant"])  # torn rows
    if not include_smoke_tests:
        frame = frame[frame[SITE] != SMOKE_TEST_SITE]
    if since is not None:
        frame = frame[frame["logged_at"] >= pd.Timestamp(_as_utc(since))]
    return frame.reset_index(drop=True)


def read_feedback(settings: Settings) -> pd.DataFrame:
    """Every feedback label: ``logged_at`` (UTC), ``encounter_hash``, ``diagnosis``."""
    frame = _read_log(feedback_dir(settings), "feedback", None, FEEDBACK_COLUMNS, ("encounter_hash", LABEL))
    return frame.reset_index(drop=True)


def label_predictions(predictions: pd.DataFrame, feedback: pd.DataFrame) -> pd.DataFrame:
    """Logged predictions whose true diagnosis came back through /feedback, joined on the encounter hash.

    The latest prediction per encounter counts (the last answer is what the clinic saw) and the latest
    label (a correction replaces the first); predictions without an encounter id cannot be labelled.
    One row per labelled encounter, oldest prediction first, with ``diagnosis``; the hash stays in.
    """
    hash_column = "encounter_hash"
    for name, frame, needed in (
        ("predictions", predictions, (hash_column,)),
        ("feedback", feedback, (hash_column, LABEL)),
    ):
        missing = [column for column in needed if column not in frame.columns]
        if missing:
            raise ValueError(f"{name} lack the column(s) {', '.join(missing)} needed to join labels to predictions")

    def latest(frame: pd.DataFrame) -> pd.DataFrame:
        frame = frame[frame[hash_column].fillna("").astype(str) != ""]
        if "logged_at" in frame.columns:
            frame = frame.sort_values("logged_at", kind="stable")
        return frame.drop_duplicates(hash_column, keep="last")

    labels = latest(feedback)[[hash_column, LABEL]]
    scored = latest(predictions.drop(columns=[LABEL], errors="ignore"))
    return scored.merge(labels, on=hash_column, how="inner").reset_index(drop=True)


# Refused requests (422) and per-site traffic -------------------------------------------------------
def log_refusal(settings: Settings, lines: Iterable[tuple[str, str, str, int, int]], now: float | None = None) -> None:
    """Append one refused request's ``(site, field, reason, count, records)`` lines to today's refusal file.

    One ``write`` on an ``O_APPEND`` descriptor: a request's lines never interleave with another's.
    Names and counts only, never a value sent. Not fsynced: a lost count costs a little monitoring
    sensitivity, and the client already has its 422.
    """
    now = time.time() if now is None else now
    stamp = datetime.fromtimestamp(now, UTC).isoformat()
    data = "".join(
        f"{stamp},{site},{name},{reason},{int(count)},{int(records)}\n" for site, name, reason, count, records in lines
    )
    if not data:
        return
    directory = refusals_dir(settings)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"refusals-{_utc_day(now)}-{os.getpid()}.csv"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        if os.fstat(fd).st_size == 0:
            data = ",".join(REFUSAL_COLUMNS) + "\n" + data
        os.write(fd, data.encode())
    finally:
        os.close(fd)


def read_refusals(settings: Settings, since: datetime | None = None, until: datetime | None = None) -> pd.DataFrame:
    """Every refusal line (:data:`REFUSAL_COLUMNS`) logged in ``[since, until)``, oldest first."""
    import pandas as pd

    frame = _read_log(refusals_dir(settings), "refusals", since, REFUSAL_COLUMNS, (SITE, "field", "reason"))
    frame = frame.dropna(subset=["count", "records"])  # torn rows
    if since is not None:
        frame = frame[frame["logged_at"] >= pd.Timestamp(_as_utc(since))]
    if until is not None:
        frame = frame[frame["logged_at"] < pd.Timestamp(_as_utc(until))]
    return frame.reset_index(drop=True)


def site_traffic(predictions: pd.DataFrame, refusals: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Per site: records scored, records refused and ``{field: {reason: records}}`` (for ``SiteTraffic.of``)."""
    found: dict[str, dict[str, Any]] = {}

    def entry(site: str) -> dict[str, Any]:
        return found.setdefault(site, {"site": site, "scored": 0, "refused": 0, "by_field": {}})

    if len(predictions) and SITE in predictions.columns:
        for site, scored in predictions[SITE].astype(str).value_counts(sort=False).items():
            entry(str(site))["scored"] = int(scored)
    for (site, name, reason), counts in refusals.groupby([SITE, "field", "reason"], sort=True)[["count", "records"]]:
        counted = entry(str(site))
        counted["refused"] += int(counts["records"].sum())
        if name == "none":  # records refused with a request although none of their fields was at fault
            continue
        reasons = counted["by_field"].setdefault(str(name), {})
        reasons[str(reason)] = reasons.get(str(reason), 0) + int(counts["count"].sum())
    return found
