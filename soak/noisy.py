"""The noisy neighbour, measured: what one session's worst statements cost it, and everyone else.

    .venv/bin/python soak/noisy.py [--size small|full] [--timeout 120] [--json]

Starts a local PostgreSQL (as `make soak` does) and, for each step, a gateway of its own with the
hostile corpus's policy (standard guardrails, column rules, content detectors for e-mail and the rest),
so a step that stalled its gateway does not weigh on the next. Each step runs while twenty other sessions
send SELECT 1 on a fixed schedule and /livez is polled (the observer of
tests/integration/test_noisy_neighbour.py), after a baseline of those alone:

  1. `SELECT '@' || repeat('a', 60000)`, through the gateway and direct to PostgreSQL;
  2. 20,000 rows of `'user'||g||'@example.com '||repeat('a',1000)` fetched, through the gateway and direct;
  3. one 100 MiB statement (the size the noisy-neighbour test asks for) (a literal whose length is checked), through the gateway and direct;
  4. two rounds of 8 concurrent sessions each sending a 120 MiB Query: the gateway process's RSS
     (VmRSS) before, at its peak in each round and after each (once /livez answers promptly again, and
     5 s more), then whether a new session still works.

--size small uses 3,000 rows, 12 MiB and 8 x 16 MiB. A statement still out after --timeout seconds is
reported as timed out (its session dropped, and the gateway killed before the next step).
`make soak` calls noisy_stage() with the full sizes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402
import httpx  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from soak.load import Check, start_upstream, stop_upstream  # noqa: E402
from tests.conftest import make_gateway  # noqa: E402
from tests.integration.test_noisy_neighbour import (  # noqa: E402
    BASELINE_SECONDS,
    LIVEZ_LIMIT,
    POLICY,
    SIZES,
    Observer,
    Size,
    Stats,
    Target,
    at_sign,
    big_statement,
    bound,
    direct_target,
    gateway_target,
    long_emails,
    run_timed,
    worst_statements,
)
from wardgate.localpg import LocalPostgres  # noqa: E402

ROUND_SESSIONS = 8
SETTLE_SECONDS = 5.0  # after a round's sessions close, before RSS counts as "after"


def vmrss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@dataclass
class Others:
    """What the other sessions saw during a step, and in the baseline just before it."""

    baseline_p99: float
    p99: float
    max: float
    samples: int
    livez_max: float
    bound: float
    errors: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, base: Stats, during: Stats, errors: list[str]) -> Others:
        return cls(base.p99, during.p99, during.max, len(during.select), during.livez_max, bound(base), errors[:5])

    def reasons(self) -> list[str]:
        out = [] if self.p99 <= self.bound else [f"the others' p99 {self.p99 * 1000:,.0f} ms over {self.bound * 1000:,.0f} ms"]
        # No poll of /livez may fall within a statement of a few milliseconds: none taken is none too slow.
        if not math.isnan(self.livez_max) and not self.livez_max < LIVEZ_LIMIT:
            out.append(f"/livez took {self.livez_max * 1000:,.0f} ms, not under {LIVEZ_LIMIT * 1000:.0f} ms")
        return out + self.errors

    def text(self) -> str:
        return f"{self.p99 * 1000:,.0f} / {self.max * 1000:,.0f} ms (baseline p99 {self.baseline_p99 * 1000:,.0f} ms)"


@dataclass
class Step:
    name: str
    gateway_s: float | None = None  # None: timed out (or failed before an answer)
    direct_s: float | None = None
    problem: str | None = None
    others: Others | None = None
    slow: list[str] = field(default_factory=list)  # callbacks that held the event loop over SLOW_CALLBACK_MS

    def reasons(self) -> list[str]:
        out = [self.problem] if self.problem else []
        if self.slow:
            out.append(f"{len(self.slow)} callbacks held the event loop over {SLOW_CALLBACK_MS} ms, e.g. {self.slow[0]}")
        if self.gateway_s is not None and self.direct_s is not None and self.gateway_s > 3 * self.direct_s + 1.0:
            out.append("through the gateway over 3 x direct + 1 s")
        return out + (self.others.reasons() if self.others else ["no measurement of the others"])

    @property
    def ok(self) -> bool:
        return not self.reasons()


@dataclass
class Memory:
    before_kib: int = 0
    # seconds, peak_kib, problems; busy_after_s (until /livez answers promptly again), after_kib (5 s later)
    rounds: list[dict] = field(default_factory=list)
    new_session_ok: bool = False
    new_session_detail: str = ""
    others: Others | None = None

    def reasons(self) -> list[str]:
        out = [p for r in self.rounds for p in r["problems"]]
        if len(self.rounds) < 2:
            out.append("round 2 not run")
        if self.rounds and self.rounds[-1]["after_kib"] > self.before_kib + 64 * 1024:
            out.append("RSS after the last round not within 64 MiB of before")
        if not self.new_session_ok:
            out.append(f"a new session after: {self.new_session_detail}")
        return out + (self.others.reasons() if self.others else ["no measurement of the others"])

    @property
    def ok(self) -> bool:
        return not self.reasons()


# The gateway logs each event-loop callback longer than this (asyncio's debug mode); any while the statements
# run fails the step. Debug mode makes everything a little slower, so the bound is above the 10 ms slice aimed at.
SLOW_CALLBACK_MS = 25


def _gateway(work: Path, pg: LocalPostgres, name: str):  # noqa: ANN202
    gw = make_gateway(work / f"noisy-{name}", pg, tail_toml=POLICY, extra_toml=f"slow_callback_ms = {SLOW_CALLBACK_MS}")
    gw.start()
    return gw


def slow_callbacks(gw, since: float, until: float) -> list[str]:  # noqa: ANN001
    """The callbacks the gateway logged as holding its event loop between `since` and `until` (while the
    worst statements ran: not while the twenty others connect or end all at once, each its own work)."""
    out = []
    for line in gw.log.read_text(errors="replace").splitlines():
        if "WARNING asyncio: Executing " not in line and "WARNING wardgate.loop: " not in line:
            continue
        try:
            at = time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")) + int(line[20:23]) / 1000
        except ValueError:
            continue
        if since <= at <= until:
            out.append(re.sub(r" created at \S+", "", line.split("Executing ", 1)[1])[:300] if "Executing " in line
                       else line.split("wardgate.loop: ", 1)[1])
    return out


def _stop(gw, stalled: bool) -> None:  # noqa: ANN001
    # A gateway still busy with a timed-out statement would take its time to answer SIGTERM.
    gw.stop(signal.SIGKILL if stalled else signal.SIGTERM)


def statement_step(work: Path, pg: LocalPostgres, size: Size, name: str, label: str, op, timeout: float) -> Step:  # noqa: ANN001
    step = Step(label)
    gw = _gateway(work, pg, name)
    stalled = False
    since = until = 0.0
    try:
        target = gateway_target(gw)
        with Observer(target) as obs:
            obs.measure("baseline", BASELINE_SECONDS)
            time.sleep(0.3)
            since = time.time()
            obs.phase(name)
            [through] = asyncio.run(worst_statements(target, size, timeout, ops=[(label, op)]))
            until = time.time()
            stats, errors = obs.finish()
        step.others = Others.of(stats["baseline"], stats[name], errors)
        step.gateway_s, step.problem = (through.seconds, through.problem)
        stalled = through.seconds is None
    finally:
        _stop(gw, stalled)
        step.slow = slow_callbacks(gw, since, until or time.time())
    [direct] = asyncio.run(worst_statements(direct_target(pg), size, timeout, ops=[(label, op)], masked=False))
    step.direct_s = direct.seconds
    if direct.problem and not step.problem:
        step.problem = f"direct: {direct.problem}"
    return step


async def _round(target: Target, size: Size, pid: int, timeout: float) -> dict:
    conns = [await target.connect() for _ in range(ROUND_SESSIONS)]
    peak = vmrss_kib(pid)
    started = time.monotonic()

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, vmrss_kib(pid))
            await asyncio.sleep(0.1)

    sampler = asyncio.create_task(sample())
    try:
        outcomes = await asyncio.gather(*(run_timed(c, f"{size.round_mib} MiB Query", big_statement, size, timeout,
                                                    True, size.round_mib) for c in conns))
    finally:
        for c in conns:
            try:
                await c.close(timeout=30)
            except (OSError, TimeoutError, asyncpg.InterfaceError):
                c.terminate()
        sampler.cancel()
    # A session ended by the gateway's inspection budget, with the error saying so, was answered: that is
    # what the budget is for.
    refused = [o for o in outcomes if o.problem and "too much data for inspection" in o.problem]
    return {"seconds": time.monotonic() - started, "peak_kib": max(peak, vmrss_kib(pid)), "refused": len(refused),
            "problems": sorted({o.problem for o in outcomes if o.problem and o not in refused})}


def _wait_responsive(http_port: int, timeout: float) -> float | None:
    """Seconds until /livez answers within 0.5 s again (a gateway may still be busy with dropped sessions' work)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        t0 = time.monotonic()
        try:
            if httpx.get(f"http://127.0.0.1:{http_port}/livez", timeout=5).status_code == 200 and time.monotonic() - t0 < 0.5:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return None


async def _new_session(target: Target) -> str | None:
    conn = await asyncio.wait_for(target.connect(), 30)
    try:
        got = await asyncio.wait_for(conn.fetchval("select 1"), 30)
        return None if got == 1 else f"select 1 returned {got!r}"
    finally:
        conn.terminate()


def memory_step(work: Path, pg: LocalPostgres, size: Size, timeout: float) -> Memory:
    mem = Memory()
    gw = _gateway(work, pg, "memory")
    stalled = False
    try:
        target = gateway_target(gw)
        pid = gw.proc.pid
        with Observer(target) as obs:
            obs.measure("baseline", BASELINE_SECONDS)
            time.sleep(2)  # the baseline's sessions and caches are in the figure "before"
            mem.before_kib = vmrss_kib(pid)
            obs.phase("rounds")
            for _ in range(2):
                result = asyncio.run(_round(target, size, pid, timeout))
                waited = _wait_responsive(gw.http_port, timeout)
                time.sleep(SETTLE_SECONDS)
                result |= {"after_kib": vmrss_kib(pid), "busy_after_s": waited}
                mem.rounds.append(result)
                if waited is None:  # still stalled: a second round would only pile on
                    result["problems"].append(f"/livez still slow {timeout:.0f} s after the round")
                    stalled = True
                    break
            stats, errors = obs.finish()
        mem.others = Others.of(stats["baseline"], stats["rounds"], errors)
        try:
            problem = asyncio.run(_new_session(target))
        except Exception as exc:  # noqa: BLE001 - reported as the step's outcome
            problem = f"{type(exc).__name__}: {exc}"
        mem.new_session_ok, mem.new_session_detail = problem is None, problem or "select 1 answered"
    finally:
        _stop(gw, stalled)
    return mem


def measure(work: Path, pg: LocalPostgres, size: Size, timeout: float, progress=None) -> tuple[list[Step], Memory]:  # noqa: ANN001
    steps = []
    for name, label, op in [
        ("at", f"SELECT '@' || repeat('a', {size.at_chars})", at_sign),
        ("emails", f"{size.email_rows:,} rows of long e-mails fetched", long_emails),
        ("big", f"one {size.statement_mib} MiB statement", big_statement),
    ]:
        if progress:
            progress(label)
        steps.append(statement_step(work, pg, size, name, label, op, timeout))
    if progress:
        progress(f"2 rounds of {ROUND_SESSIONS} x {size.round_mib} MiB Queries")
    return steps, memory_step(work, pg, size, timeout)


def _s(seconds: float | None, timeout: float) -> str:
    return f"{seconds:.2f} s" if seconds is not None else f"timed out after {timeout:.0f} s"


def _mib(kib: int) -> str:
    return f"{kib / 1024:,.0f} MiB"


def noisy_stage(work: Path, pg: LocalPostgres, size: str = "full", timeout: float = 120.0) -> list[Check]:
    """`make soak`'s rows: each statement step, and the memory rounds."""
    steps, mem = measure(work, pg, SIZES[size], timeout)
    checks = []
    for s in steps:
        o = s.others
        c = Check(f"noisy neighbour, {s.name}: {_s(s.gateway_s, timeout)} through the gateway, {_s(s.direct_s, timeout)} "
                  f"direct; the others' SELECT 1 p99 / max {o.text() if o else '?'}, /livez max "
                  f"{o.livez_max * 1000 if o else float('nan'):,.0f} ms", tried=1, passed=int(s.ok))
        for reason in s.reasons():
            c.fail(reason)
        checks.append(c)
    r = mem.rounds
    c = Check(f"noisy neighbour, {len(r)} rounds of {ROUND_SESSIONS} x {SIZES[size].round_mib} MiB Queries: gateway RSS "
              f"{_mib(mem.before_kib)} before, " + ", ".join(f"peak {_mib(x['peak_kib'])} then {_mib(x['after_kib'])}" for x in r)
              + f"; a new session after: {'works' if mem.new_session_ok else 'fails'}", tried=1, passed=int(mem.ok))
    for reason in mem.reasons():
        c.fail(reason)
    checks.append(c)
    return checks


def print_report(console: Console, size: Size, timeout: float, steps: list[Step], mem: Memory, seconds: float) -> None:
    table = Table(title=f"noisy neighbour, size {size.name} ({seconds:.0f} s); the others: 20 sessions' SELECT 1")
    for col in ("statement", "through the gateway", "direct to PostgreSQL", "others' p99 / max", "/livez max", "verdict"):
        table.add_column(col, justify="left" if col in ("statement", "verdict") else "right")
    for s in steps:
        o = s.others
        table.add_row(s.name, _s(s.gateway_s, timeout), _s(s.direct_s, timeout), o.text() if o else "",
                      f"{o.livez_max * 1000:,.0f} ms" if o else "", "ok" if s.ok else "; ".join(s.reasons()),
                      style=None if s.ok else "red")
    console.print(table)
    mt = Table(title=f"gateway RSS (VmRSS of its process), {ROUND_SESSIONS} sessions x {size.round_mib} MiB Query a round")
    for col in ("moment", "RSS", "round took", "problems"):
        mt.add_column(col, justify="left" if col in ("moment", "problems") else "right")
    mt.add_row("before", _mib(mem.before_kib), "", "")
    for i, r in enumerate(mem.rounds, 1):
        mt.add_row(f"during round {i} (peak)", _mib(r["peak_kib"]), f"{r['seconds']:.1f} s", "; ".join(r["problems"]))
        busy = "still busy" if r["busy_after_s"] is None else f"busy {r['busy_after_s']:.1f} s more"
        mt.add_row(f"after round {i} ({busy}, then {SETTLE_SECONDS:.0f} s)", _mib(r["after_kib"]), "", "")
    if len(mem.rounds) < 2:
        mt.add_row("round 2", "not run", "", "the gateway was still stalled by round 1")
    mt.add_row("a new session after", "works" if mem.new_session_ok else "fails", "", mem.new_session_detail)
    if mem.others:
        mt.add_row("the others during the rounds", f"{mem.others.text()}; /livez max {mem.others.livez_max * 1000:,.0f} ms", "", "")
    console.print(mt)
    console.print("memory: " + ("ok" if mem.ok else "; ".join(mem.reasons())), style=None if mem.ok else "red")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a statement (or a round) may take")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead of tables")
    args = parser.parse_args()
    size = SIZES[args.size]
    console = Console(stderr=args.json)
    work = Path(tempfile.mkdtemp(prefix="wardgate-noisy-"))
    work.chmod(0o711)
    started = time.time()
    with console.status("noisy: starting PostgreSQL...") as status:
        pg = start_upstream(work)
        try:
            steps, mem = measure(work, pg, size, args.timeout, lambda what: status.update(f"noisy: {what}..."))
        finally:
            stop_upstream(pg)
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps({"size": asdict(size), "timeout_s": args.timeout, "steps": [asdict(s) | {"ok": s.ok, "reasons": s.reasons()} for s in steps],
                          "memory": asdict(mem) | {"ok": mem.ok, "reasons": mem.reasons()}}, indent=2))
    else:
        print_report(console, size, args.timeout, steps, mem, time.time() - started)
    return 0 if all(s.ok for s in steps) and mem.ok else 1


if __name__ == "__main__":
    sys.exit(main())
