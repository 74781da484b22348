"""A local PostgreSQL server from the machine's binaries, for the demo, the tests and the benchmarks.

It runs in a directory of its own on a loopback port. As root it runs as the `postgres` user
(PostgreSQL refuses to run as root).
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path


class LocalPostgresError(RuntimeError):
    pass


def find_bindir() -> Path:
    env = os.environ.get("WARDGATE_PG_BINDIR")
    candidates = [env] if env else sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True)
    for c in candidates:
        if c and (Path(c) / "initdb").exists():
            return Path(c)
    raise LocalPostgresError(
        "no PostgreSQL server binaries in /usr/lib/postgresql/*/bin; install them with "
        "`apt-get install postgresql` (or set WARDGATE_PG_BINDIR)"
    )


_HANDED_OUT: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A loopback port free now, chosen below the kernel's ephemeral range: a port from that range can be
    taken, before the server binds it, by the source port of any outgoing connection."""
    low, _ = _ephemeral_range()
    start, end = (10000, low - 1) if low > 12000 else (low, 65535)
    for _ in range(200):
        port = secrets.randbelow(end - start) + start
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    with socket.socket() as s:  # a crowded machine: let the kernel choose
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalPostgres:
    def __init__(self, directory: Path, port: int | None = None, superuser_password: str | None = None) -> None:
        self.dir = Path(directory).resolve()
        self.data = self.dir / "data"
        self.port = port or free_port()
        self.password = superuser_password or secrets.token_urlsafe(12)
        self.bindir = find_bindir()
        self.proc: subprocess.Popen[bytes] | None = None
        self.run_as = "postgres" if os.geteuid() == 0 else None

    # -- helpers

    def _cmd(self, args: list[str]) -> list[str]:
        return ["runuser", "-u", self.run_as, "--", *args] if self.run_as else args

    def _chown(self, path: Path) -> None:
        if self.run_as:
            pw = pwd.getpwnam(self.run_as)
            os.chown(path, pw.pw_uid, pw.pw_gid)

    @property
    def initialized(self) -> bool:
        return (self.data / "PG_VERSION").exists()

    def initdb(self, *, ssl_cert: tuple[Path, Path] | None = None, hba: list[str] | None = None) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._chown(self.dir)
        pwfile = self.dir / "pwfile"
        pwfile.write_text(self.password + "\n")
        self._chown(pwfile)
        out = subprocess.run(
            self._cmd([str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "--pwfile", str(pwfile),
                       "-A", "scram-sha-256", "-E", "UTF8", "--locale", "C", "--no-sync"]),
            capture_output=True, text=True,
        )
        pwfile.unlink()
        if out.returncode != 0:
            raise LocalPostgresError(f"initdb failed: {out.stderr.strip()}")
        conf = [
            "listen_addresses = '127.0.0.1'",
            f"unix_socket_directories = '{self.dir}'",
            "fsync = off",
            "synchronous_commit = off",
            "full_page_writes = off",
            "max_connections = 300",
            "shared_buffers = 128MB",
        ]
        if ssl_cert:
            cert, key = ssl_cert
            for src, name in ((cert, "server.crt"), (key, "server.key")):
                dst = self.data / name
                shutil.copy(src, dst)
                os.chmod(dst, 0o600)
                self._chown(dst)
            conf += ["ssl = on", "ssl_cert_file = 'server.crt'", "ssl_key_file = 'server.key'"]
        with open(self.data / "postgresql.conf", "a") as fh:
            fh.write("\n" + "\n".join(conf) + "\n")
        rules = hba or ["host all all 127.0.0.1/32 scram-sha-256"]
        (self.data / "pg_hba.conf").write_text(
            "local all postgres trust\n" + "\n".join(rules) + "\n"
        )

    def start(self, timeout: float = 30.0) -> None:
        log = open(self.dir / "postgres.log", "ab")
        self.proc = subprocess.Popen(
            self._cmd([str(self.bindir / "postgres"), "-D", str(self.data), "-p", str(self.port)]),
            stdout=log, stderr=log, start_new_session=False,
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise LocalPostgresError(f"postgres exited at start; see {self.dir / 'postgres.log'}")
            ok = subprocess.run(
                [str(self.bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-q"], capture_output=True
            )
            if ok.returncode == 0:
                return
            time.sleep(0.1)
        raise LocalPostgresError(f"postgres did not become ready in {timeout}s; see {self.dir / 'postgres.log'}")

    @property
    def pid(self) -> int | None:
        """The postmaster's own pid (under runuser, `self.proc` is runuser, which does not pass signals on)."""
        try:
            return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (FileNotFoundError, ValueError):
            return None

    def stop(self, mode: str = "fast") -> None:
        if self.proc is None:
            return
        sig = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}[mode]
        pid = self.pid
        try:
            if pid is not None:
                os.kill(pid, sig)
            else:
                self.proc.send_signal(sig)
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
            self.proc.kill()
            self.proc.wait()
        except ProcessLookupError:
            pass
        self.proc = None

    def restart(self) -> None:
        self.stop("fast")
        self.start()

    def psql(self, sql: str, database: str = "postgres", check: bool = True) -> str:
        """Run SQL as the superuser over the local socket (trust), return stdout."""
        out = subprocess.run(
            self._cmd(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", str(self.dir), "-p", str(self.port),
                       "-U", "postgres", "-d", database, "-At", "-c", sql]),
            capture_output=True, text=True,
        )
        if check and out.returncode != 0:
            raise LocalPostgresError(f"psql failed: {out.stderr.strip()}")
        return out.stdout

    def psql_file(self, path: Path, database: str, role: str | None = None) -> None:
        """Load a SQL file (through standard input, so the server's user need not read it)."""
        sql = (f'SET ROLE "{role}";\n' if role else "") + Path(path).read_text()
        out = subprocess.run(
            self._cmd(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", str(self.dir), "-p", str(self.port),
                       "-U", "postgres", "-d", database]),
            input=sql, capture_output=True, text=True,
        )
        if out.returncode != 0:
            raise LocalPostgresError(f"loading {path} failed: {out.stderr.strip()}")

    def create_database(self, owner: str, password: str, database: str, sql_file: Path | None = None) -> None:
        """A login role with a password, a database it owns, and optionally SQL loaded as that role."""
        quoted = password.replace("'", "''")
        self.psql(f'CREATE ROLE "{owner}" LOGIN PASSWORD \'{quoted}\'')
        self.psql(f'CREATE DATABASE "{database}" OWNER "{owner}"')
        if sql_file is not None:
            self.psql_file(sql_file, database, role=owner)

    def dsn(self, user: str = "postgres", password: str | None = None, database: str = "postgres", **extra: str) -> str:
        pw = password if password is not None else self.password
        q = "&".join(f"{k}={v}" for k, v in extra.items())
        return f"postgresql://{user}:{pw}@127.0.0.1:{self.port}/{database}" + (f"?{q}" if q else "")
