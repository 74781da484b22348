"""Write-ahead journal: records are appended to a local file before the gateway forwards anything.

A record is durable against a crash of the gateway once `write` returns (the bytes are in the
operating system's cache); with `[recording] durability = "fsync"`, against a power loss once the
recorder's syncer has flushed it (syncer.py), which writers wait for. A background task drains
finished files into the store; at start-up, files left by a process that died are applied first, so
a `kill -9` loses no record.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

READY_SUFFIX = ".ready"
ATTACHED_SUFFIX = ".part"
_IOV_MAX = 1024  # buffers one writev may take (Linux)

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def event(kind: str, outcome: str, **fields: Any) -> dict[str, Any]:
    """A security-event record (it joins the audit chain when applied to the store); `fields` are
    user, agent, source, addr and detail."""
    return {"k": "event", "id": secrets.token_hex(16), "at": time.time(), "kind": kind, "outcome": outcome, **fields}


RESTARTED = "gateway restarted"  # the end of a session whose gateway process ended before the session did


def ends_after_restart(session: dict[str, Any], at: float) -> list[dict[str, Any]]:
    """A session's end record and its `session.end` event, for a session whose gateway died: ids derived
    from the session, so that recovering twice records it once."""
    sid = session["sid"]
    return [{"k": "end", "sid": sid, "at": at, "reason": RESTARTED},
            {"k": "event", "id": hashlib.sha256(f"restart-end:{sid}".encode()).hexdigest()[:32], "at": at,
             "kind": "session.end", "outcome": "ok", "user": session.get("user"), "agent": session.get("agent"),
             "source": f"session:{sid}", "addr": session.get("addr"), "detail": RESTARTED}]


def encode(records: list[dict[str, Any]]) -> str:
    return "".join([_dumps(r) + "\n" for r in records])


def read_records(path: Path, attached: list[Path] | None = None) -> list[dict[str, Any]]:
    """The records of a journal file, with those of the files it attached (`Journal.attach`) in their
    place; the paths of those files are added to `attached`, to remove with it once applied."""
    records = _read_lines(path)
    if not any(r.get("k") == "attached" for r in records):
        return records
    out: list[dict[str, Any]] = []
    for r in records:
        if r.get("k") != "attached":
            out.append(r)
            continue
        part = path.parent / str(r.get("file", ""))
        if part.parent != path.parent or not part.name.endswith(ATTACHED_SUFFIX) or not part.exists():
            continue  # never outside the journal's folder; a missing part had been applied already
        out.extend(_read_lines(part))
        if attached is not None:
            attached.append(part)
    return out


def remove(path: Path, attached: list[Path]) -> None:
    """Remove an applied journal file, and then the files it attached."""
    path.unlink(missing_ok=True)
    for part in attached:
        part.unlink(missing_ok=True)


_NUL_ESCAPE = "\\u0000"  # how JSON writes a NUL character (it never appears raw in a record)


def storable(value: Any) -> Any:
    """`value` with every NUL character in its strings (keys too) replaced by U+FFFD. PostgreSQL's text
    and jsonb cannot hold a NUL, and one record the store refuses would stop every record behind it;
    the store seals what it stores, so the audit chain holds the replaced text."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd") if "\x00" in value else value
    if isinstance(value, dict):
        return {storable(k): storable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [storable(v) for v in value]
    return value


def _read_lines(path: Path) -> list[dict[str, Any]]:
    # "replace": a lone surrogate was written as its UTF-8-like bytes (surrogatepass), read back as U+FFFD.
    text = path.read_bytes().decode("utf-8", "replace")
    records = _parse(text)
    if _NUL_ESCAPE in text:  # rare (an escaped backslash before "u0000" also matches): then walk them all
        records = [storable(r) for r in records]
    return records


def _parse(text: str) -> list[dict[str, Any]]:
    try:
        # One parse for the whole file: a record is one line, and JSON escapes every newline in a value.
        return json.loads("[" + text.rstrip("\n").replace("\n", ",") + "]")
    except ValueError:
        pass
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            # A torn final line from a crash mid-write: the statement it describes was not forwarded.
            continue
    return out


def _try_lock(path: Path) -> int | None:
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _writev_all(fd: int, parts: list[bytes]) -> None:
    views = [memoryview(p) for p in parts if p]
    while views:
        n = os.writev(fd, views[:_IOV_MAX])
        while n and views:  # drop what was written, whole parts and the front of one
            if n >= len(views[0]):
                n -= len(views.pop(0))
            else:
                views[0] = views[0][n:]
                n = 0


def fsync_dir(path: Path) -> None:
    """Make the folder's entries (files created or renamed in it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    def __init__(self, directory: Path, instance: str | None = None, *, sync: bool = False) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.instance = instance or secrets.token_hex(6)
        self._seq = 0
        self.fd = -1
        self.path: Path | None = None
        self.size = 0
        # With `sync` (durability = "fsync"), the recorder's syncer flushes what was written to disk:
        # the files finished since are handed to it (their descriptors, to flush and close), and a new
        # file's entry in the folder is flushed with the first flush of the file.
        self.sync = sync
        self.retired: list[int] = []
        self.dir_dirty = False
        # Held for the life of the process: an unlockable .lock file means its owner is alive.
        self._lock_fd = os.open(self.dir / f"{self.instance}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        self._open()

    def dead_instances(self) -> list[tuple[str, int]]:
        out = []
        for path in self.dir.glob("*.lock"):
            if path.stem != self.instance and (fd := _try_lock(path)) is not None:
                out.append((path.stem, fd))
        return out

    def forget_instances(self, dead: list[tuple[str, int]]) -> None:
        for instance, fd in dead:
            (self.dir / f"{instance}.lock").unlink(missing_ok=True)
            os.close(fd)

    def _open(self) -> None:
        self._seq += 1
        path = self.dir / f"{int(time.time() * 1000):014d}-{self.instance}-{self._seq:06d}.jsonl"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_EXCL, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        self.fd, self.path, self.size = fd, path, 0
        self._torn = False
        self.dir_dirty = True

    def write(self, data: bytes) -> None:
        """Append `data` whole, or raise OSError having appended nothing: a write that fails part way (a
        full disk) is cut off again, so no torn record sits before the ones written once there is room."""
        if self._torn:
            os.ftruncate(self.fd, self.size)
            self._torn = False
        try:
            n = os.write(self.fd, data)
            if n < len(data):  # a short write (rare for a regular file): the rest, until all is written
                view = memoryview(data)[n:]
                while view:
                    view = view[os.write(self.fd, view):]
        except OSError:
            try:
                os.ftruncate(self.fd, self.size)
            except OSError:
                self._torn = True  # cut off before the next write
            raise
        self.size += len(data)

    def write_parts(self, parts: list[bytes]) -> None:
        """`write` of the parts joined, without joining them (writev), and as whole: all or nothing."""
        if self._torn:
            os.ftruncate(self.fd, self.size)
            self._torn = False
        total = sum(map(len, parts))
        try:
            _writev_all(self.fd, parts)
        except OSError:
            try:
                os.ftruncate(self.fd, self.size)
            except OSError:
                self._torn = True
            raise
        self.size += total

    def attach(self, parts: list[bytes]) -> str:
        """Write records (`write_parts`) to a file of their own, and return its name, for the journal to
        refer to once it is complete (a `{"k": "attached", "file": name}` record). A record of many
        megabytes is written so, outside the journal's lock: the other sessions' records go on being
        written meanwhile, where one write to the journal itself would keep them all waiting for it. A
        file no record refers to (the process ended in between) is removed when its instance is recovered."""
        name = f"{int(time.time() * 1000):014d}-{self.instance}-{secrets.token_hex(6)}{ATTACHED_SUFFIX}"
        path = self.dir / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            _writev_all(fd, parts)
            if self.sync:  # on disk, with its name, before any record that refers to it can be
                os.fdatasync(fd)
                fsync_dir(self.dir)
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        os.close(fd)
        return name

    def forget_attached(self, instance: str) -> None:
        """Remove the attached files an ended instance left that no journal file referred to."""
        for path in self.dir.glob(f"*-{instance}-*{ATTACHED_SUFFIX}"):
            path.unlink(missing_ok=True)

    def _finish(self) -> None:
        """Hand the current file to the drainer: renamed to *.ready, then closed."""
        assert self.path is not None
        if self.size:
            os.rename(self.path, self.path.with_suffix(READY_SUFFIX))
        else:
            self.path.unlink(missing_ok=True)
        if self.sync and self.size:
            self.retired.append(self.fd)  # flushed (then closed) by the syncer: records in it may wait for that
        else:
            os.close(self.fd)

    def rotate(self) -> None:
        if self.size == 0:
            return
        self._finish()
        self._open()

    def close(self, *, keep_lock: bool = False) -> None:
        """Hand the current file on and let go of the instance; with `keep_lock`, its lock file stays, so
        that the next start recovers this instance as one that died (records were left unwritten)."""
        if self.fd >= 0:
            try:
                self._finish()
            except OSError:
                pass  # the file stays as it is: an orphan the next start applies
        self.fd = -1
        if not keep_lock:
            (self.dir / f"{self.instance}.lock").unlink(missing_ok=True)
        os.close(self._lock_fd)

    def probe(self) -> None:
        """Raise OSError unless a new record could be written now (the disk has room, the folder is writable)."""
        path = self.dir / f"probe-{self.instance}.tmp"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"\0" * 4096)
        finally:
            os.close(fd)
            path.unlink(missing_ok=True)

    def orphans(self) -> list[tuple[Path, int]]:
        """Files no live process holds (left by a process that ended), oldest first, locked for us."""
        out = []
        for path in sorted(self.dir.glob("*.jsonl")):
            if path == self.path:
                continue
            fd = _try_lock(path)
            if fd is not None:
                out.append((path, fd))
        return out
