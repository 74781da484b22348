"""The recorder: writes records to the journal on the hot path; a drainer process moves them to the store.

Statement starts are written before the statement is forwarded. Outcomes (duration, rows, tag) are
deferred by up to `OUTCOME_DELAY` and go out with the next write, which saves a system call per
statement; a crash in that window leaves the statement recorded with an unknown outcome.

Applying records to the store runs in a separate process, so its work never holds this
process's interpreter lock while the relay forwards bytes. The risk analysis of closed sessions runs
there too (analysis/service.py): it reads whole sessions back, which is no work for the relay's process.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import threading
from pathlib import Path
from typing import Any

from ..config import Settings
from ..store import Store
from .anchors import HEAD_FILE, read_anchor, write_head
from .journal import READY_SUFFIX, Journal, encode, ends_after_restart, read_records, remove
from .syncer import Syncer

log = logging.getLogger("wardgate.recording")

OUTCOME_DELAY = 0.02
ATTACH_MIN = 1 << 20  # bytes of records from which they are written to a file of their own (write_parts)
DRAINER_NICENESS = 10
STALLED_FILE = "store-stalled"  # beside the journal while the drainer's tries fail (`stalled`)
STALLED_AFTER = 3  # failed tries in a row before readiness says so
MAX_KEPT = 100_000  # record writes kept in memory while the journal cannot be written (Recorder.keep)


def _close_open_sessions(records: list[dict[str, Any]], at: float) -> list[dict[str, Any]]:
    """The ends, and their `session.end` events, of the sessions a dead process's journal left open."""
    open_sessions = {r["sid"]: r for r in records if r["k"] == "session" and r.get("status", "active") == "active"}
    for r in records:
        if r["k"] == "end":
            open_sessions.pop(r["sid"], None)
    return [rec for sid in sorted(open_sessions) for rec in ends_after_restart(open_sessions[sid], at)]


def apply_ready(store: Store, directory: Path) -> int:
    """Apply every finished journal file in order; return the number applied."""
    n = 0
    for path in sorted(directory.glob("*" + READY_SUFFIX)):
        attached: list[Path] = []
        store.apply_records(read_records(path, attached))
        remove(path, attached)
        n += 1
    return n


def anchor_head(store: Store, directory: Path, known: int = 0, *, sync: bool = True) -> int:
    """Copy the store's newest signed checkpoint to the head file beside the journal, if it is newer
    than `known` (the seq copied last); return the seq the file now holds. Only what the store has
    committed is copied, whichever process appended it, and only a chain that still holds the head the
    file has: a store cut back or rewritten under it (the gateway signs whatever head the store has)
    leaves the file as it was, the evidence `audit verify --anchor` names, and the log says so."""
    cp = store.checkpoint_upto()
    if cp is None or cp["seq"] <= known:
        return known
    path = directory / HEAD_FILE
    try:
        held = read_anchor(path)
    except (OSError, ValueError):
        held = None
    if held is not None and store.event_hash(int(held["seq"])) != held["hash"]:
        log.error("the audit chain in the store no longer holds the signed head kept in %s (seq %s): the store was "
                  "cut back or rewritten; the file is kept as evidence (see `wardgate audit verify --anchor`)",
                  path, held["seq"])
        return int(cp["seq"])  # said again at the next checkpoint; the file stays
    write_head(path, cp, sync=sync)
    return int(cp["seq"])


def stalled(directory: Path) -> str | None:
    """Why the drainer has not been able to move the journal into the store lately (None: it has)."""
    try:
        return (directory / STALLED_FILE).read_text(errors="replace").strip() or "unknown error"
    except OSError:
        return None


def _write_private(path: Path, text: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
    except OSError:
        log.exception("cannot write %s", path)


def drainer_main(settings: Settings, parent_pid: int, interval: float, stop: Any) -> None:
    """Entry point of the drainer process. `stop` is the reading end of a pipe from the gateway: a
    message, or its end (the gateway is gone), tells it to finish."""
    # Ctrl-C and a SIGTERM to the process group reach this process too; the gateway decides when it stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # The journal already holds every record durably; moving them into the store can wait while the
    # relay (and the database behind it) need the CPU, and catches up as soon as they do not.
    try:
        os.nice(DRAINER_NICENESS)
    except OSError:  # noqa: S110 - not allowed here: run at the normal priority
        pass
    store = Store(settings)
    directory = settings.journal_dir
    failures = 0
    anchored = 0
    done = threading.Event()
    if settings.analysis.enabled:
        from ..analysis.service import analysis_thread

        analysis_thread(Store(settings), settings.analysis, done.is_set)
    while True:
        stopping = stop.poll(0) or os.getppid() != parent_pid
        try:
            apply_ready(store, directory)
            # On disk at once with durability = "fsync"; else as the journal is (the OS writes it back).
            anchored = anchor_head(store, directory, anchored, sync=settings.recording.durability == "fsync")
            if failures:
                (directory / STALLED_FILE).unlink(missing_ok=True)
            failures = 0
        except Exception as exc:  # noqa: BLE001 - the store may be down; the files stay for the next try
            failures += 1
            if failures in (1, 10) or failures % 100 == 0:
                log.exception("cannot apply the journal to the store (attempt %d); will retry", failures)
            if failures == STALLED_AFTER:  # readiness says so (Gateway.readiness): records wait in the journal
                _write_private(directory / STALLED_FILE, f"{type(exc).__name__}: {str(exc)[:300]}")
        if stopping:
            done.set()
            return
        stop.poll(interval)


class Recorder:
    def __init__(self, store: Store, settings: Settings, *, flush_interval: float = 0.2) -> None:
        self.store = store
        self.settings = settings
        sync = settings.recording.durability == "fsync"
        self.journal = Journal(settings.journal_dir, sync=sync)
        self.flush_interval = flush_interval
        self._deferred: list[str] = []
        self.failure: str | None = None  # why the journal cannot be written now (readiness says so)
        self._lock = threading.Lock()  # the loop and the API's worker threads write
        self._timer: asyncio.TimerHandle | None = None
        self._drainer: multiprocessing.process.BaseProcess | None = None
        self._stop: Any = None
        # durability = "fsync": group commit (syncer.py); `durable()` gives the future a writer waits on
        # before it forwards what it recorded. None with durability = "os": a write returning is enough.
        self.syncer = Syncer(self.journal, self._lock) if sync else None
        self.durable = self.syncer.durable if self.syncer is not None else None

    @property
    def instance(self) -> str:
        return self.journal.instance

    @property
    def drainer_alive(self) -> bool:
        return self._drainer is not None and self._drainer.is_alive()

    def write(self, records: list[dict[str, Any]]) -> None:
        """Durable on return, with any deferred outcomes before them. Raises OSError: callers fail closed."""
        self.write_lines([encode(records)])

    async def settle(self) -> None:
        """With durability = "fsync", wait until everything written so far is on disk (before an answer
        goes out: its outcome is then in the record whatever happens to the machine)."""
        if self.durable is not None:
            await self.durable()

    async def write_durable(self, records: list[dict[str, Any]]) -> None:
        """`write`, then with durability = "fsync" wait until the records are on disk."""
        self.write(records)
        await self.settle()

    def write_lines(self, lines: list[str]) -> None:
        """`write` for records the relay encoded itself (one JSON object a line). Any thread may write."""
        with self._lock:
            # Deferred outcomes stay deferred until they are written: a failed write loses none of them.
            try:
                # surrogatepass: a lone surrogate a client sent (JSON allows "\ud800") is written, never refused
                # here; the drainer reads it back as U+FFFD (journal.storable).
                self.journal.write("".join(self._deferred + lines if self._deferred else lines).encode(
                    "utf-8", "surrogatepass"))
            except OSError as exc:
                self._failed(exc)
                raise
            self._deferred = []
            self.failure = None

    def keep(self, records: list[dict[str, Any]]) -> None:
        """`write` for records that must not be lost (a session's end): if the journal cannot take them
        now, they are kept in memory and written before anything else by the first write that succeeds
        (the recorder retries every flush interval). Never raises."""
        try:
            self.write(records)
        except OSError:
            with self._lock:
                self._deferred.append(encode(records))
                if len(self._deferred) > MAX_KEPT:  # a bound on memory: the oldest go, and the log says so
                    dropped = len(self._deferred) - MAX_KEPT
                    del self._deferred[:dropped]
                    log.error("the recording journal has not been writable for long: %d kept records dropped", dropped)

    def _failed(self, exc: OSError) -> None:
        if self.failure is None:
            log.error("cannot write the recording journal in %s: %s", self.journal.dir, exc)
        self.failure = f"{exc.strerror or exc}"

    def write_parts(self, parts: list[bytes]) -> None:
        """`write_lines` for records already encoded, in parts written as they are (a long statement's
        record is never joined into one more copy of it). Records of ATTACH_MIN bytes or more go to a
        file of their own first (`Journal.attach`), so that the lock is held only to refer to it."""
        attached = None
        if sum(map(len, parts)) >= ATTACH_MIN:
            try:
                attached = self.journal.attach(parts)
            except OSError as exc:
                self._failed(exc)
                raise
            parts = [encode([{"k": "attached", "file": attached}]).encode()]
        try:
            with self._lock:
                if self._deferred:
                    parts = ["".join(self._deferred).encode("utf-8", "surrogatepass"), *parts]
                try:
                    self.journal.write_parts(parts)
                except OSError as exc:
                    self._failed(exc)
                    raise
                self._deferred = []
                self.failure = None
        except OSError:
            if attached is not None:
                (self.journal.dir / attached).unlink(missing_ok=True)
            raise

    def defer(self, lines: list[str]) -> None:
        with self._lock:
            self._deferred.extend(lines)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(OUTCOME_DELAY, self._write_deferred)

    def _write_deferred(self) -> None:
        self._timer = None
        if self._deferred:
            try:
                self.write_lines([])
            except OSError:
                pass  # kept; said once in the log (_failed), tried again at the next flush
        elif self.failure is not None:
            try:  # nothing waits to be written: whether the journal takes writes again is tried on the side
                self.journal.probe()
                self.failure = None
                log.warning("the recording journal in %s can be written again", self.journal.dir)
            except OSError:
                pass

    def recover(self) -> int:
        """Apply what processes that ended left behind and close the sessions they held."""
        dead = self.journal.dead_instances()
        count = apply_ready(self.store, self.journal.dir)  # older than any unfinished file
        # A dead process's unfinished files are applied as one: a session opened in one of them may have
        # statements in the next, which must not come after its end.
        orphans = self.journal.orphans()
        if orphans:
            records, attached, last = [], [], 0.0
            for path, _ in orphans:
                records += read_records(path, attached)
                last = max(last, os.stat(path).st_mtime)
            records += _close_open_sessions(records, last)
            self.store.apply_records(records)
            count += len(records)
            for path, fd in orphans:
                remove(path, [])
                os.close(fd)
            remove(orphans[0][0], attached)
        if dead:
            self.store.close_sessions_of(dead)
            for instance, _ in dead:
                self.journal.forget_attached(instance)
            self.journal.forget_instances(dead)
        return count

    def start(self) -> None:
        if self._stop is not None:
            self._stop.close()  # the writer for a drainer that ended
        ctx = multiprocessing.get_context("spawn")
        # A pipe, not a multiprocessing.Event: setting an Event blocks for ever if its waiter was killed.
        reader, self._stop = ctx.Pipe(duplex=False)
        self._drainer = ctx.Process(
            target=drainer_main, args=(self.settings, os.getpid(), self.flush_interval / 2, reader),
            name="wardgate-recorder", daemon=True,
        )
        self._drainer.start()
        reader.close()

    def rotate(self) -> None:
        self._write_deferred()
        with self._lock:
            self.journal.rotate()
            finished = bool(self.journal.retired)
        if finished and self.syncer is not None:
            self.syncer.nudge()  # the file finished is flushed and closed even if no statement waits on it

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval)
            self.rotate()
            if not self.drainer_alive:
                log.error("the recorder process ended; restarting it")
                self.start()

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._write_deferred()
        with self._lock:
            if self._deferred:
                # Records still unwritten (the disk stayed full): the journal's lock file is left, so that
                # the next start treats this process as one that died and ends its sessions in the record.
                log.error("%d records could not be written to the recording journal; the next start ends the "
                          "sessions they described", len(self._deferred))
            self.journal.close(keep_lock=bool(self._deferred))
        if self.syncer is not None:
            await asyncio.to_thread(self.syncer.stop)  # the last records, and the files finished, on disk
        if self._drainer is not None:
            try:
                self._stop.send_bytes(b"stop")
            except OSError:
                pass  # the drainer is gone already
            await asyncio.to_thread(self._drainer.join, 30)
            if self._drainer.is_alive():
                log.error("the recorder process did not stop; ending it")
                self._drainer.kill()
        # Whatever the drainer could not apply is applied here, or by the next start.
        try:
            await asyncio.to_thread(apply_ready, self.store, self.journal.dir)
            await asyncio.to_thread(anchor_head, self.store, self.journal.dir)
        except Exception:  # noqa: BLE001
            log.exception("journal left for the next start")
