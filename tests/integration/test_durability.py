"""What each `[recording] durability` survives. A kill -9 loses no statement that ran, in either mode.
A power loss is simulated: the gateway's system calls are traced, and after a kill -9 each journal
file keeps only what an fdatasync had put on disk (a file whose folder entry was never flushed is
gone); then the gateway recovers. With `fsync`, every statement a client had an answer for is
still in the record, with the outcome the client saw; with `os`, what was only in the OS's cache is
lost, as documented."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import psycopg
import pytest

from tests.conftest import APP_PASSWORD, make_gateway

pytestmark = pytest.mark.skipif(not any((Path(p) / "strace").exists() for p in os.environ.get("PATH", "").split(":")),
                                reason="strace is installed by scripts/system-deps.sh test")

THREADS, EACH = 4, 40


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _traced(pid: int) -> bool:
    """Every thread of `pid` has a tracer attached."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except FileNotFoundError:  # a thread that ended meanwhile
            continue
        if re.search(r"^TracerPid:\s+0$", status, re.M):
            return False
    return True


def _traffic(gw, table: str) -> list[int]:  # noqa: ANN001
    """Sessions inserting at once; the numbers whose insert the client saw succeed."""
    cred = gw.credential()
    acked: list[int] = []
    lock = threading.Lock()

    def run(t: int) -> None:
        with psycopg.connect(gw.dsn(cred, application_name=f"{table}-{t}"), autocommit=True) as conn:
            for i in range(EACH):
                n = t * 1000 + i
                conn.execute(f"insert into {table} values ({n})")
                with lock:
                    acked.append(n)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return acked


class _Disk:
    """What the traced process had put on disk: per journal file, the length an fdatasync covered (what
    was written before the call began), and whether its entry in the folder was flushed after it was
    created (opened with O_CREAT). Calls of different threads interleave in strace's log as `<unfinished ...>` and
    `<... resumed>` halves; a call counts from its first half, and takes effect if its last succeeds."""

    CALL = re.compile(r"^(\d+)\s+(\w+)\((\d+)<([^>]*)>(.*)")
    RESUMED = re.compile(r"^(\d+)\s+<\.\.\. (\w+) resumed>.*\)\s+=\s+(-?\d+)")
    RESULT = re.compile(r"\)\s+=\s+(-?\d+)(?:<[^>]*>)?(?: \w+ \(.*\))?$")  # openat's fd comes with its path
    RENAME = re.compile(r'"([^"]+)"[^"]*"([^"]+)"')

    def __init__(self, log: Path, journal: Path) -> None:
        self.written: dict[str, int] = {}
        self.synced: dict[str, int] = {}
        self.durable_entry: set[str] = set()
        self.journal = str(journal)
        self._created: set[str] = set()
        pending: dict[str, tuple] = {}  # thread -> the first half of its call
        for line in log.read_text(errors="replace").splitlines():
            if (r := self.RESUMED.match(line)) is not None:
                started = pending.pop(r.group(1), None)
                if started is not None:
                    self._apply(*started, int(r.group(3)))
                continue
            m = self.CALL.match(line)
            if m is not None:
                tid, call, path, rest = m.group(1), m.group(2), m.group(4), m.group(5)
                # What a flush covers is fixed when it begins.
                started = (call, path, rest, self.written.get(path, 0), set(self._created))
            elif line.split()[1:2] and line.split()[1].startswith(("rename", "openat(")):
                tid, rest = line.split()[0], line
                call = "rename" if line.split()[1].startswith("rename") else "openat"
                started = (call, "", rest, 0, set())
            else:
                continue
            if line.endswith("<unfinished ...>"):
                pending[tid] = started
            elif (res := self.RESULT.search(line)) is not None:
                self._apply(*started, int(res.group(1)))

    def _apply(self, call: str, path: str, rest: str, before: int, created: set[str], result: int) -> None:
        if result < 0:
            return
        if call == "openat":  # a file created: its folder entry is durable once the folder is flushed
            created = re.search(r'"([^"]+)"', rest)
            if created is not None and "O_CREAT" in rest and created.group(1).startswith(self.journal + "/"):
                self._created.add(created.group(1))
            return
        if call == "rename":
            names = self.RENAME.search(rest)
            if names is None:
                return
            old, new = (p if p.startswith("/") else f"{self.journal}/{Path(p).name}" for p in names.groups())
            for table in (self.written, self.synced):
                if old in table:
                    table[new] = table.pop(old)
            for group in (self._created, self.durable_entry):
                if old in group:
                    group.discard(old)
                    group.add(new)
        elif call in ("write", "writev", "pwrite64") and path.startswith(self.journal + "/"):
            self.written[path] = self.written.get(path, 0) + result
            self._created.add(path)
        elif call in ("fdatasync", "fsync"):
            if path == self.journal:
                self.durable_entry |= created
            elif path in self.written:
                self.synced[path] = max(self.synced.get(path, 0), before)
        elif call == "ftruncate" and path in self.written:
            self.written[path] = int(rest.strip(", )").split(")")[0] or 0)

    def lose_power(self, journal: Path) -> tuple[int, int]:
        """Cut each journal file back to what was on disk; return (files kept, files lost)."""
        kept = lost = 0
        for path in sorted(journal.iterdir()):
            if path.suffix not in (".jsonl", ".ready", ".part"):
                continue
            key = str(path)
            if key in self.durable_entry and self.synced.get(key):
                os.truncate(path, self.synced[key])
                kept += 1
            else:
                path.unlink()
                lost += 1
        return kept, lost


def _recorded(gw, table: str) -> dict[int, str]:  # noqa: ANN001
    """number -> the recorded status of its insert."""
    out = {}
    for s in gw.sessions():
        if (s["application_name"] or "").startswith(table):
            for st in gw.session(s["id"])["statements"]:
                if m := re.fullmatch(rf"insert into {table} values \((\d+)\)", st["text"]):
                    out[int(m.group(1))] = st["status"]
    return out


@pytest.mark.parametrize("durability", ["fsync", "os"])
def test_power_loss(tmp_path, pg, durability) -> None:  # noqa: ANN001
    table = f"power_{durability}"
    gw = make_gateway(tmp_path / "gw", pg, env_extra={"WARDGATE_RECORDING_DURABILITY": durability})
    with psycopg.connect(pg.dsn("app", APP_PASSWORD, "shop"), autocommit=True) as direct:
        direct.execute(f"create table if not exists {table} (n int)")
        direct.execute(f"truncate {table}")
    gw.start()
    journal = gw.dir / "data" / "journal"
    log = tmp_path / "strace.log"
    drainers = _children(gw.proc.pid)
    for pid in drainers:  # the journal is all there is: nothing reaches the store before the power goes
        os.kill(pid, signal.SIGSTOP)
    tracer = subprocess.Popen(["strace", "-f", "-y", "-qq", "-o", str(log), "-e",
                               "trace=openat,write,writev,pwrite64,fdatasync,fsync,ftruncate,rename,renameat,renameat2",
                               "-p", str(gw.proc.pid)])
    try:
        deadline = time.monotonic() + 30
        while not _traced(gw.proc.pid):
            if tracer.poll() is not None:  # a machine that forbids ptrace cannot run this simulation
                gw.proc.kill()
                for pid in drainers:
                    os.kill(pid, signal.SIGKILL)
                pytest.skip("strace cannot attach to the gateway here (ptrace is not permitted)")
            assert time.monotonic() < deadline, "strace did not attach"
            time.sleep(0.05)
        acked = _traffic(gw, table)
        gw.proc.send_signal(signal.SIGKILL)  # the power goes: the process and the page cache with it
        gw.proc.wait()
        for pid in drainers:
            os.kill(pid, signal.SIGKILL)
        tracer.wait(30)
    finally:
        if tracer.poll() is None:
            tracer.kill()
    gw.proc = None
    kept, lost = _Disk(log, journal).lose_power(journal)
    gw.start()
    try:
        if durability == "fsync":
            assert kept >= 1
            gw.wait_for_session(lambda s: len(_recorded(gw, table)) >= len(acked), timeout=60)
            recorded = _recorded(gw, table)
            # Nothing a client had an answer for is lost: the statement, and its outcome as the client saw it.
            assert {n: recorded.get(n) for n in acked} == {n: "ok" for n in acked}
        else:
            # Nothing was flushed: the whole journal was in the page cache, and went with it.
            assert kept == 0 and lost >= 1 and _recorded(gw, table) == {}
    finally:
        gw.stop()
