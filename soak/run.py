"""`make soak`: the long part of the attack suite, and its summary.

Runs, in order:
  1. the protocol properties (hypothesis) with a large example budget,
  2. coverage-guided fuzzing (atheris) of the startup, message and SCRAM parsers, for a bounded time each,
  3. the hostile-input corpus, the masking routes (with SOAK_EXAMPLES / 10 random protocol interleavings),
     the bad-input and token tests,
  4. every real client (psql, pgbench, psycopg, asyncpg, Node.js pg, JDBC) with TLS and SCRAM,
  5. the fault tests (upstream restart and outage, kill -9, client gone mid-COPY, recorder killed, a full
     disk under the recording journal, the store going away),
  6. load: SOAK_SESSIONS client sessions (200) for SOAK_SECONDS (60) mixing reads, writes, denied
     statements, masked results and a pending review, then the checks of what it left behind,
  7. kill -9 of the gateway under load,
  8. the noisy neighbour: one session's worst statements (a 60k value with '@' under content masking,
     20,000 rows of long e-mails, a 64 MiB statement, rounds of 8 x 120 MiB Queries) against the others'
     latency, /livez, PostgreSQL direct and the gateway's memory (soak/noisy.py), and its test at full size.
Prints a table (cases tried, passed, failures with reproducers) and writes it to .soak/report.md
(and report.json). Exits non-zero when anything failed.

SOAK_EXAMPLES (20000) sets the examples per property; SOAK_FUZZ_SECONDS (60) the time per fuzz target.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from soak.load import Check, kill9_stage, load_stage, start_upstream, stop_upstream  # noqa: E402
from soak.noisy import noisy_stage  # noqa: E402

OUT = ROOT / ".soak"
SESSIONS = int(os.environ.get("SOAK_SESSIONS", "200"))
SECONDS = float(os.environ.get("SOAK_SECONDS", "60"))
EXAMPLES = int(os.environ.get("SOAK_EXAMPLES", "20000"))
FUZZ_SECONDS = int(os.environ.get("SOAK_FUZZ_SECONDS", "60"))
console = Console(width=int(os.environ.get("COLUMNS", "120")))


def pytest_stage(name: str, paths: list[str], env: dict[str, str] | None = None) -> Check:
    """A pytest run as one row: its test cases tried and passed; a failure's reproducer is its test id."""
    xml = OUT / f"{re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-')}.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *paths]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})})
    check = Check(name)
    if not xml.exists():
        check.tried = 1
        check.fail(f"pytest did not run: {out.stdout[-2000:]}{out.stderr[-2000:]}")
        return check
    for case in ET.parse(xml).getroot().iter("testcase"):  # noqa: S314 - pytest's own report of this run
        check.tried += 1
        problem = case.find("failure") if case.find("failure") is not None else case.find("error")
        if case.find("skipped") is not None:
            check.fail(f"skipped: {case.get('classname')}::{case.get('name')}")
        elif problem is None:
            check.passed += 1
        else:
            text = (problem.get("message") or "")[:300]
            falsifying = re.search(r"Falsifying example:.*?(?=\n\n|\Z)", problem.text or "", re.S)
            check.fail(f"python -m pytest '{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}'"
                       f" — {text}" + (f"\n{falsifying.group(0)[:600]}" if falsifying else ""))
    stats = [int(n) for n in re.findall(r"(\d+) passing(?: examples|,)", out.stdout)]
    if stats:
        check.name += f": {sum(stats):,} examples passed"
    return check


SEEDS = {
    "startup": [b"\x00" + bytes.fromhex("0000000800000000") + b"", b"\x07" + bytes.fromhex("00000008") + b"\x04\xd2\x16\x2f",
                b"\x10\x00\x00\x00\x21\x00\x03\x00\x00user\x00alice\x00database\x00shop\x00\x00"],
    "messages": [b"\x20Q\x00\x00\x00\x0dselect 1\x00S\x00\x00\x00\x04",
                 b"\x05P\x00\x00\x00\x10\x00select $1\x00\x00\x00B\x00\x00\x00\x0e\x00\x00\x00\x00\x00\x01"
                 b"\x00\x00\x00\x01\x31\x00\x00E\x00\x00\x00\x09\x00\x00\x00\x00\x00S\x00\x00\x00\x04"],
    "scram": [b"\x16n,,n=,r=abcdefghijklmnopqrstuvwxc=biws,r=abcdefghijklmnopqrstuvwx,p=AAAA"],
}


def fuzz_stage(target: str) -> Check:
    corpus, artifacts = OUT / "corpus" / target, OUT / "findings" / target
    corpus.mkdir(parents=True, exist_ok=True)
    artifacts.mkdir(parents=True, exist_ok=True)
    for i, seed in enumerate(SEEDS[target]):
        (corpus / f"seed-{i}").write_bytes(seed)
    cmd = [sys.executable, str(ROOT / "soak" / "fuzz_targets.py"), target, f"-max_total_time={FUZZ_SECONDS}",
           "-rss_limit_mb=2048", "-timeout=10", f"-artifact_prefix={artifacts}/", str(corpus)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    runs = re.findall(r"#(\d+)\s+(?:DONE|pulse|NEW|REDUCE|INITED)", out.stderr)
    check = Check(f"coverage-guided fuzzing (atheris): {target} parser, {FUZZ_SECONDS} s")
    check.tried = int(runs[-1]) if runs else 0
    findings = sorted(artifacts.glob("*"))
    check.passed = check.tried if out.returncode == 0 and not findings else check.tried - len(findings)
    for f in findings:
        check.fail(f"{f.relative_to(ROOT)} (replay: python soak/fuzz_targets.py {target} {f.relative_to(ROOT)})")
    if out.returncode != 0 and not findings:
        check.fail(out.stderr[-1500:])
    return check


def main() -> int:
    OUT.mkdir(exist_ok=True)
    started = time.time()
    checks: list[Check] = []
    stages = [
        ("protocol properties", lambda: [pytest_stage(
            f"protocol properties (hypothesis), up to {EXAMPLES:,} examples each",
            ["tests/unit/test_protocol_fuzz.py", "tests/unit/test_wire.py", "--hypothesis-show-statistics"],
            {"WARDGATE_FUZZ_EXAMPLES": str(EXAMPLES)})]),
        ("fuzzing", lambda: [fuzz_stage(t) for t in ("startup", "messages", "scram")]),
        ("hostile input", lambda: [pytest_stage("hostile input: guardrail bypasses, masking evasion, auth attacks",
                                                ["tests/integration/test_hostile.py"]),
                                   pytest_stage(f"masking routes: every byte a client receives against the database's values "
                                                f"(protocol sequences, SQL routes through psql, psycopg, asyncpg, JDBC), random "
                                                f"protocol interleavings up to {EXAMPLES // 10:,} examples",
                                                ["tests/integration/test_masking_routes.py", "--hypothesis-show-statistics"],
                                                {"WARDGATE_FUZZ_EXAMPLES": str(EXAMPLES // 10)}),
                                   pytest_stage("hostile input: malformed protocol, forged and expired tokens",
                                                ["tests/integration/test_bad_input.py", "tests/integration/test_oidc.py"]),
                                   pytest_stage("approval attacks: another's review, a changed statement, a replay",
                                                ["tests/integration/test_exec.py", "-k", "review or approve"]),
                                   pytest_stage(f"differential: generated statements, classifier against the real server, "
                                                f"up to {EXAMPLES:,} examples each",
                                                ["tests/integration/test_differential.py", "--hypothesis-show-statistics"],
                                                {"WARDGATE_DIFF_EXAMPLES": str(EXAMPLES)})]),
        ("clients", lambda: [pytest_stage("real clients with TLS and SCRAM: psql, pgbench, psycopg, asyncpg, Node pg, JDBC",
                                          ["tests/integration/test_clients.py", "tests/integration/test_drivers.py"])]),
        ("faults", lambda: [pytest_stage("faults: upstream restart/down, kill -9, client gone mid-COPY, recorder killed, "
                                         "full journal disk, store outage",
                                         ["tests/integration/test_resilience.py"])]),
    ]
    for label, stage in stages:
        with console.status(f"soak: {label}..."):
            checks += stage()
    work = Path(tempfile.mkdtemp(prefix="wardgate-soak-"))
    work.chmod(0o711)
    with console.status("soak: starting PostgreSQL..."):
        pg = start_upstream(work)
    try:
        with console.status(f"soak: {SESSIONS} sessions for {SECONDS:.0f} s...") as status:
            checks += load_stage(work, pg, SESSIONS, SECONDS,
                                 lambda n, left: status.update(f"soak: {SESSIONS} sessions, {n:,} statements, {left:.0f} s left"))
        with console.status("soak: kill -9 under load..."):
            checks.append(kill9_stage(work, pg))
        with console.status("soak: the noisy neighbour..."):
            checks += [pytest_stage("noisy neighbour at full size: the others' p99 and /livez while one session sends "
                                    "the worst statements", ["tests/integration/test_noisy_neighbour.py"],
                                    {"NOISY_SIZE": "full"}), *noisy_stage(work, pg)]
    finally:
        stop_upstream(pg)

    table = Table(title=f"make soak: {len(checks)} checks in {(time.time() - started) / 60:.1f} min "
                        f"({os.cpu_count()} cores)")
    for col in ("check", "tried", "passed", "failures"):
        table.add_column(col, justify="left" if col in ("check", "failures") else "right")
    for c in checks:
        table.add_row(c.name, f"{c.tried:,}", f"{c.passed:,}", "\n".join(c.failures) or "none",
                      style=None if c.ok else "red")
    console.print(table)
    lines = ["| check | tried | passed | failures |", "| --- | ---: | ---: | --- |"]
    lines += [f"| {c.name} | {c.tried:,} | {c.passed:,} | "
              f"{'<br>'.join(f.replace('|', '/').replace(chr(10), '<br>') for f in c.failures) or 'none'} |" for c in checks]
    report = OUT / "report.md"
    report.write_text(f"# make soak, {time.strftime('%Y-%m-%d %H:%M')} ({os.cpu_count()} cores)\n\n" + "\n".join(lines) + "\n")
    (OUT / "report.json").write_text(json.dumps([c.__dict__ | {"ok": c.ok} for c in checks], indent=2))
    failed = [c for c in checks if not c.ok]
    console.print(f"report: {report.relative_to(ROOT)}; " + ("[green]no failure[/]" if not failed else
                                                             f"[red]{len(failed)} checks failed[/]"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
