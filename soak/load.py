"""Load and faults for `make soak`: many TLS + SCRAM client sessions through one gateway, then the checks
a user relies on afterwards; `kill -9` of the gateway under load. (The recording journal failing and the
store going away are tests in tests/integration/test_resilience.py, which the soak runs too.)

Each stage returns a list of Check rows: what was tried, how many passed, and for each failure a
reproducer (the session, the statement, what came back)."""

from __future__ import annotations

import asyncio
import random
import shutil
import signal
import ssl
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from tests.conftest import Gateway, make_gateway, upstream_postgres
from tests.integration.test_hostile import POLICY as HOSTILE_POLICY
from wardgate.localpg import LocalPostgres
from wardgate.recording import views

# The hostile corpus's policy (standard guardrails, column and content masking), and a review for deletes.
POLICY = HOSTILE_POLICY + """
[[guardrails]]
name = "deletes-need-review"
kinds = ["delete"]
action = "review"
connections = ["shop"]
"""


@dataclass
class Check:
    name: str
    tried: int = 0
    passed: int = 0
    failures: list[str] = field(default_factory=list)

    def fail(self, reproducer: str) -> None:
        if len(self.failures) < 20:
            self.failures.append(reproducer)

    @property
    def ok(self) -> bool:
        return self.tried > 0 and self.passed == self.tried and not self.failures


# What each client does, by weight; and what the client must see.
OPS = [
    ("read", 50, "select id, email, card_number from customers where id = $1"),
    ("write", 20, "update orders set total_cents = total_cents where id = $1"),
    ("denied", 15, "delete from orders"),
    ("masked", 10, "select email, phone from customers order by id limit 20"),
    ("review", 5, "delete from orders where id = 1000000"),
]
# A statement held for review is refused for now: recorded as denied, with the review's rule.
EXPECTED_STATUS = {"read": "ok", "write": "ok", "masked": "ok", "denied": "denied", "review": "denied"}


def tls_context(gw: Gateway) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(gw.ca))
    ctx.check_hostname = False  # the gateway's certificate names 127.0.0.1 as an address; the CA is what is checked
    return ctx


async def client(app: str, gw: Gateway, secret: str, deadline: float, counts: Counter, problems: list[str],
                 rng: random.Random) -> tuple[str, Counter]:
    mine: Counter = Counter()
    conn = await asyncpg.connect(host="127.0.0.1", port=gw.port, user="loader", password=secret, database="shop",
                                 ssl=tls_context(gw), server_settings={"application_name": app}, timeout=60,
                                 statement_cache_size=100)
    try:
        names, weights = [o[0] for o in OPS], [o[1] for o in OPS]
        while time.monotonic() < deadline:
            op = rng.choices(names, weights)[0]
            sql = next(o[2] for o in OPS if o[0] == op)
            mine[op] += 1
            try:
                if op in ("read", "write"):
                    got = await conn.fetch(sql, rng.randrange(1, 201)) if op == "read" else \
                        await conn.execute(sql, rng.randrange(1, 1001))
                    if op == "read":
                        row = got[0]
                        good = row["email"] == "[email]" and not row["card_number"].startswith("4111")
                    else:
                        good = got == "UPDATE 1"
                elif op == "masked":
                    rows = await conn.fetch(sql)
                    good = len(rows) == 20 and all(r["email"] == "[email]" and r["phone"] == "[phone]" for r in rows)
                else:
                    await conn.execute(sql)
                    good = False  # it should not have run
                    problems.append(f"{app}: {sql!r} ran")
            except asyncpg.InsufficientPrivilegeError as exc:
                good = (op == "denied" and "standard:unconditional-writes" in str(exc)) or \
                       (op == "review" and "needs review" in str(exc))
                if not good:
                    problems.append(f"{app}: {sql!r} refused: {exc}")
            except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as exc:
                problems.append(f"{app}: {sql!r} failed: {type(exc).__name__}: {exc}")
                good = False
                if conn.is_closed():
                    break
            counts[f"{op} {'as expected' if good else 'wrong'}"] += 1
    finally:
        await conn.close()
    return app, mine


def rss_kib(pid: int) -> int:
    total = 0
    for p in [pid, *children(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def upstream_sessions(pg: LocalPostgres) -> int:
    return int(pg.psql("select count(*) from pg_stat_activity where usename = 'app' and datname = 'shop'").strip())


def recorded_sessions(gw: Gateway, apps: set[str], timeout: float = 120.0) -> dict[str, dict]:
    """The store's view of these sessions, once every one is closed and has no statement still running."""
    store = gw.store()
    deadline, found = time.time() + timeout, {}
    while time.time() < deadline:
        found = {s["application_name"]: s for s in views.list_sessions(store, user="loader", limit=len(apps) + 50)
                 if s["application_name"] in apps}
        if len(found) == len(apps) and all(s["status"] == "closed" for s in found.values()):
            details = {app: views.show_session(store, s["id"]) for app, s in found.items()}
            if all(st["status"] != "running" for d in details.values() for st in d["statements"]):
                return details
        time.sleep(1)
    return {app: views.show_session(store, s["id"]) for app, s in found.items()}


async def run_clients(gw: Gateway, secret: str, sessions: int, seconds: float, problems: list[str],
                      progress=None, prefix: str = "soak") -> tuple[Counter, dict[str, Counter]]:  # noqa: ANN001
    counts: Counter = Counter()
    deadline = time.monotonic() + seconds
    tasks = []
    for i in range(sessions):  # connect in waves, as a pool fills up
        tasks.append(asyncio.create_task(client(f"{prefix}-{i}", gw, secret, deadline, counts, problems, random.Random(i))))
        if i % 20 == 19:
            await asyncio.sleep(0.2)
    while not all(t.done() for t in tasks):
        await asyncio.sleep(1)
        if progress:
            progress(sum(counts.values()), max(0.0, deadline - time.monotonic()))
    per_session: dict[str, Counter] = {}
    for t in tasks:
        if t.exception() is not None:
            problems.append(f"a client could not run: {type(t.exception()).__name__}: {t.exception()}")
        else:
            app, mine = t.result()
            per_session[app] = mine
    return counts, per_session


def load_stage(work: Path, pg: LocalPostgres, sessions: int, seconds: float, progress=None) -> list[Check]:  # noqa: ANN001
    gw = make_gateway(work / "load", pg, tail_toml=POLICY, users=False)
    gw.cli("users", "add", "loader", "--group", "dev")
    gw.start()
    checks: list[Check] = []
    try:
        secret = gw.credential("loader", ttl="2h")["credential"]
        problems: list[str] = []
        asyncio.run(run_clients(gw, secret, 5, 3, problems, prefix="warm-up"))  # imports, caches, the first plans
        time.sleep(2)
        baseline = rss_kib(gw.proc.pid)
        counts, per_session = asyncio.run(run_clients(gw, secret, sessions, seconds, problems, progress))

        outcome = Check(f"{sessions} sessions for {seconds:.0f} s: each statement's outcome as expected")
        outcome.tried = sum(counts.values())
        outcome.passed = sum(n for k, n in counts.items() if k.endswith("as expected"))
        for p in problems:
            outcome.fail(p)
        checks.append(outcome)

        errors = Check("zero protocol errors (gateway log and clients)")
        errors.tried = sum(counts.values())
        log = gw.log.read_text(errors="replace") if gw.log else ""
        bad = [line for line in log.splitlines() if "protocol violation" in line or "Traceback" in line
               or "internal gateway error" in line]
        errors.passed = errors.tried if not bad and not any("failed:" in p for p in problems) else 0
        for line in bad[:10]:
            errors.fail(f"gateway log: {line}")
        checks.append(errors)

        once = Check("every statement recorded exactly once, with its outcome")
        details = recorded_sessions(gw, set(per_session))
        for app, mine in per_session.items():
            once.tried += sum(mine.values())
            d = details.get(app)
            if d is None:
                once.fail(f"{app}: no session record")
                continue
            statuses = Counter((st["text"], st["status"]) for st in d["statements"])
            want = Counter({(next(o[2] for o in OPS if o[0] == op), EXPECTED_STATUS[op]): n for op, n in mine.items()})
            if statuses == want:
                once.passed += sum(mine.values())
            else:
                once.fail(f"{app}: client sent {sorted(want.items())}, recorded {sorted(statuses.items())}")
            seqs = [st.get("seq") for st in d["statements"]]
            if len(seqs) != len(set(seqs)):
                once.fail(f"{app}: a statement recorded twice")
        checks.append(once)

        leaks = Check("no upstream connection left open")
        leaks.tried = len(per_session)
        deadline = time.time() + 30
        while upstream_sessions(pg) and time.time() < deadline:
            time.sleep(0.5)
        left = upstream_sessions(pg)
        leaks.passed = leaks.tried if left == 0 else 0
        if left:
            leaks.fail(f"{left} upstream sessions still open 30 s after every client closed")
        checks.append(leaks)

        memory = Check("gateway memory back to baseline (within 64 MiB)")
        time.sleep(5)
        after = rss_kib(gw.proc.pid)
        memory.tried = 1
        memory.passed = 1 if after <= baseline + 64 * 1024 else 0
        detail = f"RSS of the gateway and its recorder: {baseline // 1024} MiB before, {after // 1024} MiB after"
        memory.name += f": {baseline // 1024} → {after // 1024} MiB"
        if not memory.passed:
            memory.fail(detail)
        checks.append(memory)
    finally:
        gw.stop()
    return checks


async def _inserts(gw: Gateway, secret: str, worker: int, stop: asyncio.Event, sent: list[tuple[int, int]]) -> None:
    try:
        conn = await asyncpg.connect(host="127.0.0.1", port=gw.port, user="loader", password=secret, database="shop",
                                     ssl=tls_context(gw), timeout=30)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return
    n = 0
    try:
        while not stop.is_set():
            n += 1
            await conn.execute(f"insert into soak_kill values ({worker}, {n})")  # simple protocol: literal text
            sent.append((worker, n))
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        pass  # the gateway was killed under it


def kill9_stage(work: Path, pg: LocalPostgres, workers: int = 40, seconds: float = 8.0) -> Check:
    """kill -9 of the gateway under load: every statement that reached the database has its record."""
    pg.psql("create table if not exists soak_kill (worker int, n int); truncate soak_kill; "
            "grant all on soak_kill to app", database="shop")
    gw = make_gateway(work / "kill9", pg, tail_toml=POLICY, users=False)
    gw.cli("users", "add", "loader", "--group", "dev")
    gw.start()
    check = Check(f"kill -9 of the gateway under load ({workers} clients inserting)")
    try:
        secret = gw.credential("loader", ttl="1h")["credential"]

        async def run() -> list[tuple[int, int]]:
            stop, sent = asyncio.Event(), []
            tasks = [asyncio.create_task(_inserts(gw, secret, w, stop, sent)) for w in range(workers)]
            await asyncio.sleep(seconds)
            gw.proc.send_signal(signal.SIGKILL)
            await asyncio.sleep(0.5)
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            return sent

        asyncio.run(run())
        gw.proc.wait()
        gw.proc = None
        gw.start()  # recovers the journal the killed process left
        ran = [tuple(map(int, line.split("|"))) for line in
               pg.psql("select worker || '|' || n from soak_kill", database="shop").split()]
        check.tried = len(ran)
        texts: set[str] = set()
        deadline = time.time() + 60
        while time.time() < deadline:
            texts = {st["text"] for s in views.list_sessions(gw.store(), user="loader", limit=workers + 20)
                     for st in views.show_session(gw.store(), s["id"])["statements"]}
            if all(f"insert into soak_kill values ({w}, {n})" in texts for w, n in ran):
                break
            time.sleep(1)
        missing = [(w, n) for w, n in ran if f"insert into soak_kill values ({w}, {n})" not in texts]
        check.passed = len(ran) - len(missing)
        for w, n in missing[:10]:
            check.fail(f"row ({w}, {n}) is in the database, its statement has no record")
    finally:
        gw.stop()
    return check


def start_upstream(work: Path) -> LocalPostgres:
    return upstream_postgres(work / "upstream")


def stop_upstream(pg: LocalPostgres) -> None:
    pg.stop()
    shutil.rmtree(pg.dir, ignore_errors=True)

