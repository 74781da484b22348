"""Throughput and latency through the gateway, as ratios to a direct connection measured in the same run.

Starts a local PostgreSQL and a gateway, then runs pgbench -S (simple, extended, prepared; 8
clients), a 1,000-row fetch, and a one-client latency probe, alternating direct and gateway runs;
then the same through two references that forward bytes only (a bare Python relay, PgBouncer), and
one against two gateway replicas on a PostgreSQL store.
BENCH_SECONDS sets the length of each run (default 10), BENCH_ROUNDS the alternations (default 2),
BENCH_ONLY a text that selects the workloads to run by name.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from wardgate.localpg import LocalPostgres, free_port

SECONDS = int(os.environ.get("BENCH_SECONDS", "10"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "2"))
ONLY = os.environ.get("BENCH_ONLY", "")  # run only the workloads whose name contains this text
console = Console(width=int(os.environ.get("COLUMNS", "110")))


def pgbench(dsn: str, *args: str) -> tuple[float, float]:
    out = subprocess.run(["pgbench", "-n", *args, "-T", str(SECONDS), dsn], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    tps = float(re.search(r"tps = ([\d.]+)", out.stdout).group(1))
    latency = float(re.search(r"latency average = ([\d.]+) ms", out.stdout).group(1))
    return tps, latency


def pgbench_pair(dsns: tuple[str, str], *args: str) -> tuple[float, float]:
    """Two pgbench processes at once, one per DSN: their tps added, their latency averaged."""
    procs = [subprocess.Popen(["pgbench", "-n", *args, "-T", str(SECONDS), dsn], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for dsn in dsns]
    out = []
    for proc in procs:
        stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(stderr)
        out.append((float(re.search(r"tps = ([\d.]+)", stdout).group(1)),
                    float(re.search(r"latency average = ([\d.]+) ms", stdout).group(1))))
    return sum(t for t, _ in out), sum(lat for _, lat in out) / len(out)


def run_any(target: str | tuple[str, str], *args: str) -> tuple[float, float]:
    return pgbench(target, *args) if isinstance(target, str) else pgbench_pair(target, *args)


def start_gateway(cli: list[str], env: dict[str, str], http_port: int, log_path: Path) -> subprocess.Popen:
    log = open(log_path, "wb")
    proc = subprocess.Popen([*cli, "serve"], stdout=log, stderr=log, env=env)
    for _ in range(300):
        try:
            if httpx.get(f"http://127.0.0.1:{http_port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"a gateway did not start: {log_path.read_text()}")


def pgbouncer(pg: LocalPostgres, work: Path, password: str) -> tuple[Path | None, str]:
    """PgBouncer (C, session pooling) in front of the same server: what a production proxy that only
    forwards costs on this machine. (its pid file, DSN); (None, "") when it is not installed."""
    binary = shutil.which("pgbouncer") or ("/usr/sbin/pgbouncer" if Path("/usr/sbin/pgbouncer").exists() else None)
    if binary is None:
        return None, ""
    home = work / "pgbouncer"
    home.mkdir()
    port = free_port()
    (home / "users.txt").write_text(f'"bench" "{password}"\n')
    (home / "pgbouncer.ini").write_text(
        f"[databases]\nbench = host=127.0.0.1 port={pg.port} dbname=bench user=bench password={password}\n"
        f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = scram-sha-256\nauth_file = {home / 'users.txt'}\npool_mode = session\n"
        f"max_client_conn = 100\ndefault_pool_size = 20\nlogfile = {home / 'pgbouncer.log'}\n"
        f"pidfile = {home / 'pgbouncer.pid'}\n")
    cmd = [binary, "-d", str(home / "pgbouncer.ini")]
    if os.geteuid() == 0:  # it refuses to run as root, like PostgreSQL
        shutil.chown(home, "postgres")
        for f in home.iterdir():
            shutil.chown(f, "postgres")
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    subprocess.run(cmd, check=True, capture_output=True)
    dsn = f"postgresql://bench:{password}@127.0.0.1:{port}/bench?sslmode=disable"
    for _ in range(100):
        if subprocess.run(["psql", dsn, "-Atc", "select 1"], capture_output=True).returncode == 0:
            return home / "pgbouncer.pid", dsn
        time.sleep(0.1)
    raise RuntimeError(f"PgBouncer did not start: {(home / 'pgbouncer.log').read_text()}")


def replicas(pg: LocalPostgres, work: Path, password: str) -> tuple[list[subprocess.Popen], str, str]:
    """Two gateways on one PostgreSQL store (in the benchmark's own server): their DSNs for one user."""
    from cryptography.fernet import Fernet

    pg.psql("CREATE DATABASE wardgate_store OWNER bench")
    shared = {"WARDGATE_STORE_URL": pg.dsn("bench", password, "wardgate_store"),
              "WARDGATE_SECRET_KEY": Fernet.generate_key().decode(), "WARDGATE_CONN_BENCH_PASSWORD": password}
    procs, dsns = [], []
    for i, name in enumerate(("a", "b")):
        port, http_port = free_port(), free_port()
        config = work / f"replica-{name}.toml"
        config.write_text(
            f'data_dir = "{work / ("replica-" + name)}"\n[gateway]\nlisten = "127.0.0.1:{port}"\n'
            f'http_listen = "127.0.0.1:{http_port}"\n[[connections]]\nname = "bench"\nhost = "127.0.0.1"\n'
            f'port = {pg.port}\ndatabase = "bench"\nuser = "bench"\npassword_env = "WARDGATE_CONN_BENCH_PASSWORD"\nsslmode = "disable"\n'
            '[[access]]\ngroups = ["bench"]\nconnections = ["bench"]\n')
        env = {**os.environ, **shared}
        cli = [sys.executable, "-m", "wardgate.cli", "--config", str(config)]
        if i == 0:
            subprocess.run([*cli, "users", "add", "bench", "--group", "bench"], check=True, capture_output=True, env=env)
            cred = json.loads(subprocess.run([*cli, "credentials", "issue", "-u", "bench", "-C", "bench", "--ttl", "2h",
                                              "--json"], check=True, capture_output=True, text=True, env=env).stdout)
        procs.append(start_gateway(cli, env, http_port, work / f"replica-{name}.log"))
        dsns.append(f"postgresql://bench:{cred['credential']}@127.0.0.1:{port}/bench?sslmode=disable")
    return procs, dsns[0], dsns[1]


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="wardgate-bench-"))
    work.chmod(0o711)  # the server may run as the postgres user
    pg = LocalPostgres(work / "pg")
    gw_proc = relay_proc = fsync_proc = None
    bouncer_pid: Path | None = None
    replica_procs: list[subprocess.Popen] = []
    try:
        with console.status("starting PostgreSQL and loading pgbench data (scale 10)..."):
            pg.initdb()
            pg.start()
            password = secrets.token_urlsafe(12)
            pg.create_database("bench", password, "bench")
            direct = pg.dsn("bench", password, "bench", sslmode="disable")
            subprocess.run(["pgbench", "-i", "-s", "10", "-q", direct], check=True, capture_output=True)
        port, http_port = free_port(), free_port()
        config = work / "wardgate.toml"
        config.write_text(
            f'data_dir = "{work / "gw"}"\n[gateway]\nlisten = "127.0.0.1:{port}"\nhttp_listen = "127.0.0.1:{http_port}"\n'
            f'[[connections]]\nname = "bench"\nhost = "127.0.0.1"\nport = {pg.port}\ndatabase = "bench"\n'
            f'user = "bench"\npassword_env = "WARDGATE_CONN_BENCH_PASSWORD"\nsslmode = "disable"\n'
            '[[access]]\ngroups = ["bench"]\nconnections = ["bench*"]\n'
            # the same database again, with the demo's policy: standard guardrails and masking of two columns
            f'[[connections]]\nname = "bench_policy"\nhost = "127.0.0.1"\nport = {pg.port}\ndatabase = "bench"\n'
            f'user = "bench"\npassword_env = "WARDGATE_CONN_BENCH_PASSWORD"\nsslmode = "disable"\n'
            '[[guardrails]]\npreset = "standard"\nconnections = ["bench_policy"]\n'
            '[[masking]]\nname = "two-columns"\ncolumns = ["filler", "abalance"]\nstrategy = "redact"\nconnections = ["bench_policy"]\n'
        )
        env = {**os.environ, "WARDGATE_CONN_BENCH_PASSWORD": password}
        cli = [sys.executable, "-m", "wardgate.cli", "--config", str(config)]

        def credential(cli: list[str], connection: str) -> dict:
            return json.loads(subprocess.run([*cli, "credentials", "issue", "-u", "bench", "-C", connection, "--ttl", "2h",
                                              "--json"], check=True, capture_output=True, text=True, env=env).stdout)

        subprocess.run([*cli, "users", "add", "bench", "--group", "bench"], check=True, capture_output=True, env=env)
        cred = credential(cli, "bench")
        gw_proc = start_gateway(cli, env, http_port, work / "gateway.log")
        # The same gateway with [recording] durability = "fsync": each statement's record on disk before it runs.
        fsync_port, fsync_http = free_port(), free_port()
        fsync_config = work / "wardgate-fsync.toml"
        fsync_config.write_text(config.read_text().replace(str(work / "gw"), str(work / "gw-fsync"))
                                .replace(f"127.0.0.1:{port}", f"127.0.0.1:{fsync_port}")
                                .replace(f"127.0.0.1:{http_port}", f"127.0.0.1:{fsync_http}")
                                + '[recording]\ndurability = "fsync"\n')
        fsync_cli = [sys.executable, "-m", "wardgate.cli", "--config", str(fsync_config)]
        subprocess.run([*fsync_cli, "users", "add", "bench", "--group", "bench"], check=True, capture_output=True, env=env)
        fsync_cred = credential(fsync_cli, "bench")
        fsync_proc = start_gateway(fsync_cli, env, fsync_http, work / "gateway-fsync.log")
        gateway_fsync = f"postgresql://bench:{fsync_cred['credential']}@127.0.0.1:{fsync_port}/bench?sslmode=disable"
        relay_port = free_port()
        relay_proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "relay.py"), str(relay_port), str(pg.port)])
        relay = pg.dsn("bench", password, "bench", sslmode="disable").replace(f":{pg.port}/", f":{relay_port}/")
        gateway = f"postgresql://bench:{cred['credential']}@127.0.0.1:{port}/bench?sslmode=disable"
        cred2 = credential(cli, "bench_policy")
        policy = f"postgresql://bench:{cred2['credential']}@127.0.0.1:{port}/bench_policy?sslmode=disable"
        gateway_tls = gateway.replace("sslmode=disable", "sslmode=require")
        bouncer_pid, bouncer = pgbouncer(pg, work, password)
        fetch = work / "fetch.sql"
        fetch.write_text("SELECT * FROM pgbench_accounts WHERE aid <= 1000;\n")
        pair: tuple[str, str] = ("", "")
        one: tuple[str, str] = ("", "")
        if not ONLY or "replica" in ONLY:
            with console.status("starting two gateway replicas on a PostgreSQL store..."):
                replica_procs, dsn_a, dsn_b = replicas(pg, work, password)
            pair, one = (dsn_a, dsn_b), (dsn_a, dsn_a)

        cases = [
            ("pgbench -S simple, 8 clients", ["-S", "-M", "simple", "-c", "8", "-j", "2"], gateway),
            ("pgbench -S extended, 8 clients", ["-S", "-M", "extended", "-c", "8", "-j", "2"], gateway),
            ("pgbench -S prepared, 8 clients", ["-S", "-M", "prepared", "-c", "8", "-j", "2"], gateway),
            ("pgbench -S simple, 8 clients, TLS to gateway", ["-S", "-M", "simple", "-c", "8", "-j", "2"], gateway_tls),
            ("1,000-row fetch, 4 clients", ["-f", str(fetch), "-c", "4", "-j", "2"], gateway),
            ("pgbench -S simple, 1 client", ["-S", "-M", "simple", "-c", "1"], gateway),
            ("durability os: pgbench tpcb-like (writes), 8 clients", ["-M", "simple", "-c", "8", "-j", "2"], gateway),
            ("durability fsync: pgbench tpcb-like (writes), 8 clients", ["-M", "simple", "-c", "8", "-j", "2"],
             gateway_fsync),
            ("durability fsync: pgbench -S simple, 8 clients", ["-S", "-M", "simple", "-c", "8", "-j", "2"], gateway_fsync),
            ("durability fsync: pgbench -S simple, 1 client", ["-S", "-M", "simple", "-c", "1"], gateway_fsync),
            ("policy on: pgbench -S simple, 8 clients", ["-S", "-M", "simple", "-c", "8", "-j", "2"], policy),
            ("policy on: 1,000-row fetch, 2 masked columns, 4 clients", ["-f", str(fetch), "-c", "4", "-j", "2"], policy),
            ("reference: bare Python byte relay, -S simple, 8 clients", ["-S", "-M", "simple", "-c", "8", "-j", "2"], relay),
            ("reference: PgBouncer (C, forwards only), -S simple, 8 clients", ["-S", "-M", "simple", "-c", "8", "-j", "2"],
             bouncer),
            # PostgreSQL store: 4 + 4 clients on one replica, then 4 on each of two (direct: 4 + 4 too)
            ("PostgreSQL store, 1 replica: -S simple, 4+4 clients", ["-S", "-M", "simple", "-c", "4"], one),
            ("PostgreSQL store, 2 replicas: -S simple, 4+4 clients", ["-S", "-M", "simple", "-c", "4"], pair),
        ]
        table = Table(title=f"Wardgate vs direct ({SECONDS}s runs, best of {ROUNDS}, {os.cpu_count()} cores)")
        for col in ("workload", "direct tps", "through tps", "ratio", "added latency / query"):
            table.add_column(col, justify="right" if col != "workload" else "left")
        with console.status("benchmarking...") as status:
            for name, args, target in cases:
                if (ONLY and ONLY not in name) or not target:
                    continue
                best_direct, best_gw = (0.0, 0.0), (0.0, 0.0)
                for r in range(ROUNDS):
                    status.update(f"{name}: round {r + 1}/{ROUNDS}")
                    d = run_any(direct if isinstance(target, str) else (direct, direct), *args)
                    g = run_any(target, *args)
                    best_direct = max(best_direct, d)
                    best_gw = max(best_gw, g)
                ratio = best_gw[0] / best_direct[0]
                added_us = (best_gw[1] - best_direct[1]) * 1000
                table.add_row(name, f"{best_direct[0]:,.0f}", f"{best_gw[0]:,.0f}", f"{ratio:.2f}x", f"{added_us:,.0f} µs")
        console.print(table)
        console.print(
            "Added latency is the difference of pgbench's average latency; at one client it is the cost per query.\n"
            "The reference rows relay bytes without parsing or recording anything: a bare Python relay (the ceiling\n"
            "for a Python proxy here) and PgBouncer (what a production proxy in C costs here; absent when not installed).\n"
            "The replica rows run two pgbench processes at once; on one machine the replicas share its cores.\n"
            "The durability rows compare \\[recording] durability: os (the default; a record is in the OS's cache before\n"
            "its statement runs) and fsync (on disk first; sessions waiting at once share each flush)."
        )
        return 0
    finally:
        if bouncer_pid is not None and bouncer_pid.exists():
            os.kill(int(bouncer_pid.read_text()), signal.SIGTERM)
        for proc in (gw_proc, fsync_proc, relay_proc, *replica_procs):
            if proc is not None:
                proc.terminate()
                proc.wait(30)
        pg.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
