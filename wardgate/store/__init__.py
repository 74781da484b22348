"""The store: users, connections, credentials and recorded sessions (SQLAlchemy 2, SQLite or PostgreSQL)."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import itertools
import json
import os
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import sessionmaker

from ..config import ConfigError, ConnectionSpec, Settings, validate_connection
from ..domain import Identity
from ..engines.postgres.scram import DEFAULT_ITERATIONS, Verifier, make_verifier
from ..names import MAX_NAME, REMOVED_PREFIX, name_key, valid_agent_name, valid_person_name, valid_service_name
from ..recording import audit, seals
from ..recording.journal import ends_after_restart
from . import bus
from . import models as m
from .secretbox import SecretBox, SecretError

MIGRATIONS = Path(__file__).parent / "migrations"
API_KEY_PREFIX = "wgk_"
_STMT_COLUMNS = (
    "session_id", "seq", "kind", "text", "param_count", "started_at", "status", "duration_ms", "rows",
    "command_tag", "error_code", "error_message", "decision", "rules", "params", "result",
)
_EVENT_COLUMNS = (*audit.FIELDS, "seq", "prev_hash", "hash")
_EVENT_COLUMN_LIST = ", ".join(f'"{c}"' for c in _EVENT_COLUMNS)
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def _event_id(*parts: object) -> str:
    """A stable id for an event derived from a record, so that a journal applied twice adds it once."""
    return hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:32]
_STMT_COLUMN_LIST = ", ".join(f'"{c}"' for c in _STMT_COLUMNS)
# Where a statement's outcome and result go in its row (apply_records fills them in place).
_OUTCOME = slice(_STMT_COLUMNS.index("status"), _STMT_COLUMNS.index("error_message") + 1)
_RESULT = _STMT_COLUMNS.index("result")
CREDENTIAL_PREFIX = "wgc_"


@dataclass(frozen=True)
class Actor:
    """Who makes a change, for its audit event: the person (and agent), and through which door."""

    user: str | None
    source: str  # cli, api, mcp, config:<path>
    agent: str | None = None
    addr: str | None = None

    @classmethod
    def local(cls, source: str) -> "Actor":
        """The operating-system account running this process, on this host (the CLI, a config file applied)."""
        import getpass

        try:
            account = getpass.getuser()
        except (KeyError, OSError):
            account = f"uid:{os.getuid()}"
        return cls(f"{account}@{os.uname().nodename}", source)


def _connection_view(spec: ConnectionSpec) -> dict[str, Any]:
    """A connection's settings for a change record: the password never, only whether it is set."""
    return {"host": spec.host, "port": spec.port, "database": spec.database, "user": spec.user, "sslmode": spec.sslmode,
            "sslrootcert": spec.sslrootcert, "password_env": spec.password_env, "password": "set" if spec.password else None,
            "password_auth": spec.password_auth}


# Where a connection points: changing any of these drops its stored secret unless the change supplies it
# again, so that an admin cannot have the gateway send a password to a server it was not entered for.
CONNECTION_TARGET = ("host", "port", "database", "sslmode", "sslrootcert")
SECRET_DROPPED = ("the stored password was dropped: the connection points elsewhere and the change did not "
                  "supply it again")


def diff(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, Any]:
    """{key: [old, new]} for every key whose value differs."""
    before, after = before or {}, after or {}
    return {k: [before.get(k), after.get(k)] for k in sorted(before.keys() | after.keys()) if before.get(k) != after.get(k)}


# What the store raises when it cannot be reached (down, restarting, out of connections, a locked or
# failing SQLite file): callers answer "try again" instead of an internal error.
UNAVAILABLE: tuple[type[Exception], ...] = (sa.exc.OperationalError, sa.exc.InterfaceError)
UNAVAILABLE_MESSAGE = "the gateway's store is unavailable"


class NotFound(LookupError):
    pass


class Refused(PermissionError):
    """An identity that may not act: removed, disabled, or named like another identity."""


class Conflict(ValueError):
    pass


@dataclass(frozen=True)
class IssuedCredential:
    id: str
    secret: str  # shown once; only a SCRAM verifier of it is stored
    user: str
    connection: str
    expires_at: float
    agent: str | None = None


@dataclass(frozen=True)
class IssuedApiKey:
    row: m.ApiKey
    secret: str  # shown once; only its SHA-256 is stored


@dataclass(frozen=True)
class ConnectionInfo:
    spec: ConnectionSpec
    source: str  # "config" or "store"
    note: str | None = None  # what a change did beyond what was asked (its secret dropped)

    def public(self) -> dict[str, Any]:
        s = self.spec
        return {
            "name": s.name,
            "host": s.host,
            "port": s.port,
            "database": s.database,
            "user": s.user,
            "sslmode": s.sslmode,
            "password": "env:" + s.password_env if s.password_env else ("set" if s.password else "none"),
            "password_auth": s.password_auth,
            "source": self.source,
        }


def _event_row(r: dict[str, Any]) -> dict[str, Any]:
    """An event journal record (journal.event) as a row of the events table, before it is chained."""
    return {"id": r["id"], "at": r["at"], "kind": r["kind"], "outcome": r["outcome"], "user_name": r.get("user"),
            "agent": r.get("agent"), "source": r.get("source"), "client_addr": r.get("addr"), "detail": r.get("detail")}


def _engine(url: str, *, sync: bool = False) -> sa.Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):  # noqa: ANN001
            cur = dbapi_conn.cursor()
            # WAL keeps readers and the gateway's writer apart; a write that returned survives a
            # crash of the process (it is in the OS's cache), which is what recording relies on. With
            # durability = "fsync", a commit is on disk too: the recorder removes journal files once
            # applied, so the store must keep what they held through a power loss.
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA synchronous={'FULL' if sync else 'NORMAL'}")
            cur.close()

        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    return sa.create_engine(url, pool_pre_ping=True)



def _new_user(name: str, groups: list[str], source: str, *, kind: str = "user", subject: str | None = None) -> m.User:
    return m.User(name=name, name_key=name_key(name), groups=sorted(set(groups)), scram_salt=os.urandom(16),
                  created_at=time.time(), disabled=False, source=source, kind=kind, subject=subject,
                  uid=secrets.token_hex(8))


def _alike(s: Any, name: str) -> m.User | None:
    """The live user whose name reads like `name` (the same user, or one `name` would be mistaken for)."""
    return s.scalar(select(m.User).where(m.User.name_key == name_key(name)))


def _same_agent(agent: str | None, agent_id: str | None) -> Any:
    """A review asked for by an agent is run by that agent (its key, not only its name; a review from
    before agents were told apart by key: its name); one the person asked for, by the person."""
    if agent is None:
        return m.Review.agent.is_(None)
    if agent_id is None:  # an agent known by its name only (native): its name
        return m.Review.agent == agent
    return sa.and_(m.Review.agent == agent, sa.or_(m.Review.agent_id.is_(None), m.Review.agent_id == agent_id))


def _masked_key(connection: str) -> str:
    """The snapshot that keeps a connection's masked columns (connection names may be longer than the key)."""
    return "masked:" + hashlib.sha256(connection.encode()).hexdigest()[:48]

class Store:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine = _engine(settings.store_url, sync=settings.recording.durability == "fsync")
        self.Session = sessionmaker(self.engine, expire_on_commit=False)
        self.box = SecretBox.from_settings(settings.secret_key, settings.data_dir / "secret.key")
        self._insert = (sqlite.insert if self.engine.dialect.name == "sqlite" else postgresql.insert)
        self._config_connections = {c.name: c for c in settings.connections}
        self._signer: audit.Signer | None = None
        self._sealing = False  # the chain is known to hold a record.seal event (see _legacy)

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    @classmethod
    def open(cls, settings: Settings) -> "Store":
        store = cls(settings)
        store.migrate()
        return store

    def migrate(self) -> None:
        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        head = ScriptDirectory.from_config(cfg).get_current_head()
        with self.engine.begin() as conn:
            if MigrationContext.configure(conn).get_current_revision() == head:
                return
            if conn.dialect.name == "postgresql":
                # Replicas that start together migrate once.
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(7276838)"))
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    def close(self) -> None:
        self.engine.dispose()

    # ---------------------------------------------------------------------------------- users

    def add_user(self, name: str, groups: list[str], actor: Actor | None = None) -> m.User:
        name = name.strip()
        if not valid_person_name(name, local=True):
            raise ConfigError(f"invalid user name {name!r}: use letters, digits, '.', '_', '-' "
                              f"(at most {MAX_NAME} characters)")
        with self.Session.begin() as s:
            taken = _alike(s, name)
            if taken is not None:
                raise Conflict(f"user {name!r} already exists" if taken.name == name else
                               f"the name {name!r} reads like that of the user {taken.name!r}; choose another")
            user = _new_user(name, groups, "local")
            s.add(user)
            self.record_change(s, actor, "user.create", f"{name} ({user.uid}): groups {', '.join(user.groups) or '(none)'}")
        return user

    def list_users(self, include_removed: bool = False) -> list[m.User]:
        q = select(m.User).order_by(m.User.name)
        if not include_removed:
            q = q.where(m.User.removed_at.is_(None))
        with self.Session() as s:
            return list(s.scalars(q))

    def get_user(self, name: str) -> m.User | None:
        """The live (not removed) user of that name."""
        with self.Session() as s:
            return s.scalar(select(m.User).where(m.User.name == name, m.User.removed_at.is_(None)))

    def user_by_uid(self, uid: str) -> m.User | None:
        with self.Session() as s:
            return s.scalar(select(m.User).where(m.User.uid == uid)) if uid else None

    def set_user_groups(self, name: str, groups: list[str], actor: Actor | None = None) -> m.User:
        """A local user's groups, replaced. Their console sessions end, so the new groups apply at once
        (native sessions check access when they start)."""
        groups = sorted({g.strip() for g in groups if g.strip()})
        bad = [g for g in groups if len(g) > 128 or any(c in g for c in "\x00,:/ ")]
        if bad:
            raise ConfigError(f"invalid group name {bad[0]!r}: use letters, digits, '.', '_', '-'")
        with self.Session.begin() as s:
            user = s.scalar(select(m.User).where(m.User.name == name, m.User.removed_at.is_(None)))
            if user is None:
                raise NotFound(f"no user named {name!r}; see `wardgate users list`")
            if user.source != "local" or user.kind != "user":
                where = "the identity provider's claims" if user.source.startswith("oidc:") else "its API keys"
                raise Conflict(f"{name!r} comes from {user.source}: its groups come from {where}")
            old = sorted(user.groups or [])
            if old == groups:
                return user
            user.groups = groups
            self.record_change(s, actor, "user.groups",
                               f"{name}: groups {', '.join(old) or '(none)'} -> {', '.join(groups) or '(none)'}")
            s.execute(sa.delete(m.ConsoleState).where(m.ConsoleState.user_id == user.uid))
        return user

    def remove_user(self, name: str, actor: Actor | None = None) -> dict[str, int]:
        """End an identity: every credential, API key, console session, grant and open review of it is
        revoked, and it is refused at every door (a still-valid IdP token included) until restored. The
        name is free for someone else, who starts with nothing: records name the identity by its uid."""
        now = time.time()
        with self.Session.begin() as s:
            # Locked: a key or credential issued meanwhile waits for this, then finds the user removed.
            user = s.scalar(select(m.User).where(m.User.name == name, m.User.removed_at.is_(None)).with_for_update())
            if user is None:
                raise NotFound(f"no user named {name!r}; see `wardgate users list`")
            counts = self._revoke_everything(s, user, now, actor)
            self.record_change(s, actor, "user.remove", f"{name} ({user.uid}): removed; revoked "
                               + ", ".join(f"{n} {what}" for what, n in counts.items()))
            # The name is freed: its key goes, and the row is named by its uid ('#' is in no live name).
            user.disabled, user.removed_at, user.revoked_before = True, now, now
            user.former_name, user.name, user.name_key = name, f"{REMOVED_PREFIX}{user.uid}", None
            return counts

    def _revoke_everything(self, s: Any, user: m.User, now: float, actor: Actor | None) -> dict[str, int]:
        counts = {}
        counts["credentials"] = s.execute(update(m.Credential).where(
            m.Credential.user_id == user.id, m.Credential.revoked_at.is_(None)).values(revoked_at=now)).rowcount
        counts["API keys"] = s.execute(update(m.ApiKey).where(
            m.ApiKey.user_id == user.uid, m.ApiKey.revoked_at.is_(None)).values(revoked_at=now)).rowcount
        counts["console sessions"] = s.execute(sa.delete(m.ConsoleState).where(m.ConsoleState.user_id == user.uid)).rowcount
        # Pending and approved reviews (statements not yet run, access windows not yet ended) go with them.
        open_ = select(m.Review.id).where(m.Review.requester_id == user.uid, m.Review.status.in_(("pending", "approved")))
        ids = list(s.scalars(open_))
        if ids:
            s.execute(update(m.Review).where(m.Review.id.in_(ids)).values(status="revoked", decided_at=now))
            for review_id in ids:
                s.add(m.ReviewDecision(review_id=review_id, by=actor.user if actor else "wardgate", decision="revoke",
                                       reason="the requester's identity was removed", at=now))
                self.announce(s, "review", review_id)
        counts["reviews and grants"] = len(ids)
        self.announce(s, "credential", "*")
        return counts

    def restore_user(self, name: str, actor: Actor | None = None) -> m.User:
        """Bring back a removed identity, named by the name it had or by its uid: its history, and none
        of its credentials, keys or reviews (they stay revoked). Several removed under one name: refused,
        naming their uids."""
        with self.Session.begin() as s:
            rows = list(s.scalars(select(m.User).where(m.User.uid == name, m.User.removed_at.is_not(None))))
            if not rows:  # the exact name it had (SQLite's LIKE would match it case-insensitively)
                rows = list(s.scalars(select(m.User).where(m.User.former_name == name, m.User.removed_at.is_not(None))))
            if not rows:
                raise NotFound(f"no removed user named {name!r}; see `wardgate users list --removed`")
            if len(rows) > 1:
                raise Conflict(f"{len(rows)} removed identities were named {name!r} (ids "
                               f"{', '.join(r.uid for r in rows)}); restore one by its id: "
                               f"`wardgate users restore {rows[0].uid}`")
            row = rows[0]
            old = row.former_name or row.name
            taken = _alike(s, old)
            if taken is not None:
                raise Conflict(f"the name {old!r} now belongs to the user {taken.name!r}; remove that one first")
            # revoked_before stays: links, keys and credentials issued before the removal stay dead.
            row.name, row.name_key, row.former_name, row.removed_at, row.disabled = old, name_key(old), None, None, False
            self.record_change(s, actor, "user.restore", f"{old} ({row.uid}): restored, with no live credentials or keys")
            return row

    def resolve(self, identity: Identity) -> Identity:
        """The identity with its user's stable id; creates the user of a verified token on first sight and
        keeps its groups current. Raises Refused for an identity removed or disabled, or whose name
        belongs to another identity. Blocking."""
        if identity.source.startswith("oidc:"):
            row = self._ensure_token_user(identity)
        else:
            row = self.user_by_uid(identity.uid) if identity.uid else self.get_user(identity.user)
            if row is None:
                raise Refused(f"no user {identity.user!r}")
        if row.removed_at is not None or row.disabled:
            raise Refused(f"the identity {identity.user!r} was removed; an administrator may restore it with "
                          f"`wardgate users restore {identity.user}`")
        return dataclasses.replace(identity, uid=row.uid, user=row.name)

    TOUCH = 10.0  # seconds: how stale a token user's `seen_at` may get before a request writes it again

    def _ensure_token_user(self, identity: Identity) -> m.User:
        """The user a verified token names: keyed by (provider, subject), never by its name."""
        now = time.time()
        kind = "service" if identity.kind == "service" else "user"
        groups = sorted(set(identity.groups))
        with self.Session.begin() as s:
            # By (provider, subject) whatever kind the token says: a removed person's subject does not come
            # back as a service client (client_id == sub), nor a service's as a person.
            row = s.scalar(select(m.User).where(m.User.source == identity.source, m.User.subject == identity.subject)
                           .order_by(m.User.id.desc()).limit(1))
            if row is not None and row.removed_at is not None:
                return row
            if row is not None and row.kind != kind:
                raise Refused(f"the identity provider's subject of {identity.user!r} is known here as a {row.kind}, "
                              f"and this token presents it as a {kind}; an administrator must remove one of them")
            # Who holds the name, or one that reads alike (the row itself, most often: no second look-up then).
            holder = row if row is not None and row.name == identity.user else _alike(s, identity.user)
            if holder is not None and holder is not row:
                raise Refused(f"the name {identity.user!r} belongs to another identity ({holder.source}), or reads "
                              "like its name; an administrator must rename or remove one of them")
            if row is None:
                row = _new_user(identity.user, groups, identity.source, kind=kind, subject=identity.subject)
                row.seen_at = now
                s.add(row)
                return row
            if row.name != identity.user or row.groups != groups or (row.seen_at or 0) < now - self.TOUCH:
                row.name, row.name_key, row.groups, row.seen_at = identity.user, name_key(identity.user), groups, now
            return row

    def service_account(self, name: str) -> m.User:
        """The user behind service keys named `name` (svc:<name>), made on the first key."""
        principal = name if name.startswith("svc:") else f"svc:{name}"
        if not valid_service_name(principal):
            raise ConfigError(f"invalid service account name {name!r}: use letters, digits, '.', '_', '-' "
                              f"(at most {MAX_NAME - 4} characters)")
        with self.Session.begin() as s:
            row = _alike(s, principal)
            if row is None:
                row = _new_user(principal, [], "apikey", kind="service")
                s.add(row)
            elif row.name != principal:
                raise Conflict(f"{principal!r} reads like the name of {row.name!r}; choose another name")
            elif row.kind != "service" or row.source != "apikey":
                raise Conflict(f"{principal!r} is a service client of {row.source}, not a service account of API keys")
            return row

    # ---------------------------------------------------------------------------- connections

    def announce(self, s: Any, topic: str, key: str) -> None:
        """Tell every gateway replica about a change, at this transaction's commit (see bus.py)."""
        if self.engine.dialect.name == "postgresql":
            s.execute(sa.text("SELECT pg_notify(:channel, :payload)"), {"channel": bus.CHANNEL, "payload": f"{topic}:{key}"})

    def announce_now(self, topic: str, key: str) -> bool:
        """`announce` in a transaction of its own; False on a store that has no event channel (SQLite)."""
        if self.engine.dialect.name != "postgresql":
            return False
        with self.engine.begin() as conn:
            self.announce(conn, topic, key)
        return True

    def record_change(self, s: Any, actor: Actor | None, kind: str, detail: str) -> None:
        """An audit event for a change, in the transaction (ORM session or connection) that makes it:
        durable with it, or neither."""
        if actor is None:
            return
        conn = s if isinstance(s, sa.Connection) else s.connection()
        self._append_events(conn, [{
            "id": secrets.token_hex(16), "at": time.time(), "kind": kind, "outcome": "ok", "user_name": actor.user,
            "agent": actor.agent, "source": actor.source, "client_addr": actor.addr, "detail": detail}])

    def add_connection(self, spec: ConnectionSpec, actor: Actor | None = None) -> None:
        validate_connection(spec, self.settings.upstream.password_env_prefix)
        if spec.name in self._config_connections:
            raise Conflict(f"connection {spec.name!r} is declared in the config file; edit it there")
        with self.Session.begin() as s:
            self.record_change(s, actor, "connection.create",
                               f"{spec.name}: {_dumps(diff(None, _connection_view(spec)))}")
            if s.scalar(select(m.Connection).where(m.Connection.name == spec.name)):
                raise Conflict(f"connection {spec.name!r} already exists; remove it first to change it")
            s.add(
                m.Connection(
                    name=spec.name,
                    host=spec.host,
                    port=spec.port,
                    database=spec.database,
                    username=spec.user,
                    password_enc=self.box.encrypt(spec.password) if spec.password else None,
                    password_env=spec.password_env,
                    sslmode=spec.sslmode,
                    sslrootcert=spec.sslrootcert,
                    password_auth=spec.password_auth,
                    created_at=time.time(),
                )
            )

    def _stored_connection(self, s: Any, name: str, verb: str) -> m.Connection:
        """The store's row for a connection `verb` (edit, remove) may change; config ones are the file's."""
        if name in self._config_connections:
            raise Conflict(f"connection {name!r} is declared in the config file; {verb} it there")
        row = s.scalar(select(m.Connection).where(m.Connection.name == name))
        if row is None:
            raise NotFound(f"no connection named {name!r}")
        return row

    def update_connection(self, name: str, changes: dict[str, Any], actor: Actor | None = None) -> ConnectionInfo:
        """Change a stored connection in place (its credentials stay valid); `password` is encrypted.
        A change of where it points (CONNECTION_TARGET) drops its password and password_env unless the
        same change supplies one again."""
        with self.Session.begin() as s:
            row = self._stored_connection(s, name, "edit")
            spec = self._spec(row)
            before = _connection_view(spec)
            for key, value in changes.items():
                if not hasattr(spec, key) or key == "name":
                    raise ConfigError(f"a connection has no setting {key!r} to change")
                setattr(spec, key, value)
            new_password, new_env = bool(changes.get("password")), bool(changes.get("password_env"))
            if new_password:
                spec.password_env = changes.get("password_env")
            if new_env:
                spec.password = changes.get("password")
            moved = any(before[k] != getattr(spec, k) for k in CONNECTION_TARGET)
            dropped = moved and not (new_password or new_env) and bool(spec.password or spec.password_env)
            if dropped:
                spec.password = spec.password_env = None
            validate_connection(spec, self.settings.upstream.password_env_prefix)
            row.host, row.port, row.database, row.username = spec.host, spec.port, spec.database, spec.user
            row.password_enc = self.box.encrypt(spec.password) if spec.password else None
            row.password_env, row.sslmode, row.sslrootcert = spec.password_env, spec.sslmode, spec.sslrootcert
            row.password_auth = spec.password_auth
            changed = diff(before, _connection_view(spec))
            if new_password:
                # "replaced" whether or not it equals the old one: the record must not confirm a guess.
                changed["password"] = [before["password"], "replaced" if before["password"] else "set"]
            detail = f"{name}: {_dumps(changed)}"
            if dropped:
                detail += f"; {SECRET_DROPPED}"
            self.record_change(s, actor, "connection.update", detail)
        return ConnectionInfo(spec, "store", SECRET_DROPPED + " (give password or password_env with the change)"
                              if dropped else None)

    def remove_connection(self, name: str, actor: Actor | None = None) -> None:
        with self.Session.begin() as s:
            row = self._stored_connection(s, name, "remove")
            self.record_change(s, actor, "connection.remove",
                               f"{name}: {_dumps(diff(_connection_view(self._spec(row)), None))}; its credentials revoked")
            s.delete(row)
            s.execute(update(m.Credential).where(m.Credential.connection == name, m.Credential.revoked_at.is_(None)).values(revoked_at=time.time()))

    def masked_columns(self, connection: str) -> dict[str, str]:
        """The columns masking rules have masked on `connection`, by identity ("relid:attnum" -> rule), as
        kept across restarts: a rename of one does not unmask it (see masking/catalog.py)."""
        with self.Session() as s:
            snap = s.get(m.Snapshot, _masked_key(connection))
            return dict(snap.body) if snap is not None else {}

    def remember_masked(self, connection: str, columns: dict[str, str]) -> None:
        """Keep `columns` (added to what is kept already) for masked_columns."""
        key = _masked_key(connection)
        with self.Session.begin() as s:
            snap = s.get(m.Snapshot, key, with_for_update=True)
            merged = {**(snap.body if snap is not None else {}), **columns}
            digest = hashlib.sha256(_dumps(merged).encode()).hexdigest()
            if snap is None:
                s.add(m.Snapshot(name=key, digest=digest, body=merged, at=time.time()))
            elif snap.digest != digest:
                snap.digest, snap.body, snap.at = digest, merged, time.time()

    def note_policy(self, body: dict[str, Any], actor: Actor) -> dict[str, Any] | None:
        """Compare the policy in force with the last one seen; on a change, record `policy.change` with
        what changed, and remember the new one. Returns the change, or None."""
        digest = hashlib.sha256(_dumps(body).encode()).hexdigest()
        with self.Session.begin() as s:
            snap = s.get(m.Snapshot, "policy", with_for_update=True)
            if snap is not None and snap.digest == digest:
                return None
            before = snap.body if snap is not None else {}
            changed = {}
            for section in sorted(before.keys() | body.keys()):
                old, new = before.get(section, []), body.get(section, [])
                if old != new:
                    old_keys = {_dumps(x) for x in old}
                    new_keys = {_dumps(x) for x in new}
                    changed[section] = {"removed": [x for x in old if _dumps(x) not in new_keys],
                                        "added": [x for x in new if _dumps(x) not in old_keys]}
            detail = _dumps(changed)
            if len(detail) > 8000:
                detail = detail[:7990] + "…"
            self.record_change(s, actor, "policy.change", ("first policy seen: " if snap is None else "") + detail)
            if snap is None:
                s.add(m.Snapshot(name="policy", digest=digest, body=body, at=time.time()))
            else:
                snap.digest, snap.body, snap.at = digest, body, time.time()
            return changed

    def _spec(self, row: m.Connection) -> ConnectionSpec:
        return ConnectionSpec(
            name=row.name,
            host=row.host,
            port=row.port,
            database=row.database,
            user=row.username,
            password=self.box.decrypt(row.password_enc) if row.password_enc else None,
            password_env=row.password_env,
            sslmode=row.sslmode,
            sslrootcert=row.sslrootcert,
            password_auth=row.password_auth or "scram-sha-256",
        )

    def list_connections(self) -> list[ConnectionInfo]:
        out = [ConnectionInfo(c, "config") for c in self._config_connections.values()]
        with self.Session() as s:
            out += [ConnectionInfo(self._spec(r), "store") for r in s.scalars(select(m.Connection))]
        return sorted(out, key=lambda c: c.spec.name)

    def get_connection(self, name: str) -> ConnectionSpec | None:
        if name in self._config_connections:
            return self._config_connections[name]
        with self.Session() as s:
            row = s.scalar(select(m.Connection).where(m.Connection.name == name))
            return self._spec(row) if row else None

    # ---------------------------------------------------------------------------- credentials

    def issue_credential(
        self, user_name: str, connection: str, ttl: float, agent: str | None = None, lease: float | None = None,
        not_after: float | None = None, actor: Actor | None = None, uid: str | None = None,
    ) -> IssuedCredential:
        """`not_after`: the credential ends then at the latest (the end of a grant's window). `uid`: the
        user by id (a caller the authenticator resolved), rather than by `user_name`."""
        if not_after is not None:
            ttl = min(ttl, not_after - time.time())
        if ttl <= 0:
            raise ConfigError("the TTL must be positive")
        if ttl > self.settings.max_ttl:
            raise ConfigError(
                f"a TTL of {int(ttl)}s is over the maximum of {int(self.settings.max_ttl)}s "
                "([credentials] max_ttl in the config)"
            )
        if self.get_connection(connection) is None:
            raise NotFound(f"no connection named {connection!r}; see `wardgate connections list`")
        now = time.time()
        with self.Session.begin() as s:
            who = m.User.uid == uid if uid else m.User.name == user_name
            user = s.scalar(select(m.User).where(who, m.User.removed_at.is_(None), m.User.disabled.is_(False))
                            .with_for_update())  # a removal committing meanwhile is waited for (remove_user)
            if user is None:
                raise NotFound(f"no user named {user_name!r}; add one with `wardgate users add {user_name}`")
            user_name = user.name
            cred_id = secrets.token_hex(6)
            secret = f"{CREDENTIAL_PREFIX}{cred_id}_{secrets.token_urlsafe(24)}"
            verifier = make_verifier(secret, user.scram_salt, DEFAULT_ITERATIONS)
            s.add(
                m.Credential(
                    id=cred_id,
                    user_id=user.id,
                    connection=connection,
                    iterations=verifier.iterations,
                    stored_key=verifier.stored_key,
                    server_key=verifier.server_key,
                    created_at=now,
                    expires_at=now + ttl,
                    agent=agent,
                    lease_until=now + lease if lease else None,
                )
            )
            self.record_change(s, actor, "credential.issue",
                               f"credential {cred_id} for {user_name} on {connection}, valid {int(ttl)}s")
        return IssuedCredential(cred_id, secret, user_name, connection, now + ttl, agent)

    def revoke_credential(self, cred_id: str, actor: Actor | None = None) -> m.Credential:
        with self.Session.begin() as s:
            cred = s.get(m.Credential, cred_id)
            if cred is None:
                raise NotFound(f"no credential with id {cred_id!r}; see `wardgate credentials list`")
            if cred.revoked_at is None:
                cred.revoked_at = time.time()
                self.record_change(s, actor, "credential.revoke", f"credential {cred_id} on {cred.connection}")
                self.announce(s, "credential", cred_id)
            return cred

    def list_credentials(self, user: str | None = None, include_inactive: bool = False,
                         uid: str | None = None) -> list[tuple[m.Credential, str]]:
        """`user`: of the live user of that name; `uid`: of that identity."""
        now = time.time()
        q = select(m.Credential, m.User.name).join(m.User, m.User.id == m.Credential.user_id)
        if uid is not None:  # "" (an identity the store never resolved) owns nothing
            q = q.where(m.User.uid == uid)
        elif user:
            q = q.where(m.User.name == user)
        if not include_inactive:
            q = q.where(m.Credential.revoked_at.is_(None), m.Credential.expires_at > now)
        with self.Session() as s:
            return [(c, n) for c, n in s.execute(q.order_by(m.Credential.created_at))]

    def auth_material(self, user_name: str, connection: str) -> tuple[m.User | None, list[tuple[str, Verifier]], dict[str, str]]:
        """The user, the verifiers of its live credentials for `connection`, and the agents they were issued to."""
        now = time.time()
        with self.Session() as s:
            user = s.scalar(select(m.User).where(m.User.name == user_name))
            if user is None or user.disabled or user.removed_at is not None:
                return None, [], {}
            rows = list(s.scalars(
                select(m.Credential).where(
                    m.Credential.user_id == user.id,
                    m.Credential.created_at > (user.revoked_before or 0),  # none from before a removal
                    m.Credential.connection == connection,
                    m.Credential.revoked_at.is_(None),
                    m.Credential.expires_at > now,
                    sa.or_(m.Credential.lease_until.is_(None), m.Credential.lease_until > now),
                )
            ))
            verifiers = [(c.id, Verifier(user.scram_salt, c.iterations, c.stored_key, c.server_key)) for c in rows]
            return user, verifiers, {c.id: c.agent for c in rows if c.agent}

    def credential_owner(self, cred_id: str) -> tuple[str, str] | None:
        """The uid and name of the user a credential belongs to, or None if there is no such credential."""
        with self.Session() as s:
            row = s.execute(
                select(m.User.uid, m.User.name).join(m.Credential, m.Credential.user_id == m.User.id)
                .where(m.Credential.id == cred_id)
            ).first()
            return (row[0], row[1]) if row else None

    def dead_credentials(self, ids: Iterable[str], now: float | None = None) -> dict[str, str]:
        """Of `ids`, those revoked or expired, with the reason."""
        ids = list(ids)
        if not ids:
            return {}
        now = time.time() if now is None else now
        out: dict[str, str] = {}
        with self.Session() as s:
            found = {c.id: c for c in s.scalars(select(m.Credential).where(m.Credential.id.in_(ids)))}
            # A credential whose user was removed is dead too, even one issued while the removal committed.
            gone = set(s.scalars(select(m.Credential.id).join(m.User, m.User.id == m.Credential.user_id).where(
                m.Credential.id.in_(ids), sa.or_(m.User.removed_at.is_not(None), m.User.disabled.is_(True),
                                                 m.Credential.created_at <= sa.func.coalesce(m.User.revoked_before, 0)))))
        for cred_id in ids:
            c = found.get(cred_id)
            if c is None or c.revoked_at is not None or cred_id in gone:
                out[cred_id] = "revoked"
            elif c.expires_at <= now:
                out[cred_id] = "expired"
            elif c.lease_until is not None and c.lease_until <= now:
                out[cred_id] = "not renewed: the sign-in behind it is no longer confirmed"
        return out

    def renew_lease(self, cred_id: str, uid: str, lease: float, agent: str | None = None) -> float:
        """Extend the lease of a live credential of the user `uid` (issued to `agent`); the new end."""
        now = time.time()
        with self.Session.begin() as s:
            row = s.execute(
                select(m.Credential).join(m.User, m.User.id == m.Credential.user_id)
                .where(m.Credential.id == cred_id, m.User.uid == uid, m.User.removed_at.is_(None),
                       m.Credential.agent.is_(None) if agent is None else m.Credential.agent == agent)
            ).scalar_one_or_none()
            if row is None or row.revoked_at is not None or row.expires_at <= now:
                raise NotFound(f"no live credential {cred_id!r} of yours")
            if row.lease_until is None:
                return row.expires_at
            if row.lease_until <= now:
                raise NotFound(f"credential {cred_id} lapsed: its lease was not renewed in time")
            row.lease_until = min(now + lease, row.expires_at)
            return row.lease_until

    def mark_used(self, cred_id: str) -> None:
        with self.Session.begin() as s:
            s.execute(update(m.Credential).where(m.Credential.id == cred_id).values(last_used_at=time.time()))

    # ------------------------------------------------------------------------------- api keys

    def create_api_key(
        self, *, name: str, kind: str, user_name: str, agent: str | None, groups: list[str], ttl: float | None,
        created_by: str | None, actor: Actor | None = None, uid: str | None = None,
    ) -> IssuedApiKey:
        """kind agent: a key acting for the person `uid` (or the live user `user_name`); kind service: a key
        of the service account svc:<user_name>, made with its first key."""
        if kind == "agent":
            if not agent or not valid_agent_name(agent):
                raise ConfigError(f"invalid agent name {agent!r}: printable, at most {MAX_NAME} characters, "
                                  "no leading or trailing spaces")
            person = self.user_by_uid(uid) if uid else self.get_user(user_name)
            if person is None or person.removed_at is not None or person.kind != "user":
                raise NotFound(f"no user named {user_name!r}: an agent key acts for an existing person")
        elif kind == "service":
            person = self.service_account(user_name)
        else:
            raise ConfigError("an API key is for a service account or for an agent")
        key_id = secrets.token_hex(6)
        secret = f"{API_KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
        now = time.time()
        row = m.ApiKey(
            id=key_id, name=name, kind=kind, user_name=person.name, user_id=person.uid, agent=agent,
            groups=sorted(set(groups)), secret_hash=hashlib.sha256(secret.encode()).digest(), created_by=created_by,
            created_at=now, expires_at=now + ttl if ttl else None,
        )
        with self.Session.begin() as s:
            # Locked and checked again: a removal committing meanwhile is waited for, and then refuses the key.
            live = s.scalar(select(m.User.id).where(m.User.uid == person.uid, m.User.removed_at.is_(None),
                                                    m.User.disabled.is_(False)).with_for_update())
            if live is None:
                raise NotFound(f"no user named {person.name!r}: it was removed")
            s.add(row)
            self.record_change(s, actor, "apikey.create", f"API key {key_id} ({name}, {kind} of {person.name}"
                               + (f", groups {', '.join(row.groups)}" if row.groups else "") + ")")
        return IssuedApiKey(row, secret)

    def list_api_keys(self, include_inactive: bool = False, uid: str | None = None) -> list[m.ApiKey]:
        """`uid`: only the keys of that identity (its agents', or a service account's)."""
        now = time.time()
        q = select(m.ApiKey).order_by(m.ApiKey.created_at)
        if uid is not None:
            q = q.where(m.ApiKey.user_id == uid)
        if not include_inactive:
            q = q.where(m.ApiKey.revoked_at.is_(None), sa.or_(m.ApiKey.expires_at.is_(None), m.ApiKey.expires_at > now))
        with self.Session() as s:
            return list(s.scalars(q))

    def revoke_api_key(self, key_id: str, actor: Actor | None = None) -> None:
        with self.Session.begin() as s:
            row = s.get(m.ApiKey, key_id)
            if row is None:
                raise NotFound(f"no API key with id {key_id!r}; see `wardgate apikeys list`")
            if row.revoked_at is None:
                row.revoked_at = time.time()
                self.record_change(s, actor, "apikey.revoke", f"API key {key_id} ({row.name})")

    def api_key_active(self, key_id: str) -> bool:
        now = time.time()
        with self.Session() as s:
            row = s.get(m.ApiKey, key_id)
            return row is not None and row.revoked_at is None and (row.expires_at is None or row.expires_at > now)

    def api_key(self, presented: str, confirm_within: float | None = None) -> tuple[m.ApiKey, list[str], m.User]:
        """The live key matching `presented`, the groups it acts with and the user it acts as; NotFound
        otherwise. An agent key acts with its person's groups as they are now; for a person of an IdP,
        that is as the IdP last confirmed them, and only while that was within `confirm_within` seconds."""
        key_id = presented[len(API_KEY_PREFIX):].split("_", 1)[0] if presented.startswith(API_KEY_PREFIX) else ""
        digest = hashlib.sha256(presented.encode()).digest()
        now = time.time()
        with self.Session.begin() as s:
            row = s.get(m.ApiKey, key_id) if key_id else None
            if row is None or not hmac.compare_digest(row.secret_hash, digest):
                raise NotFound("the API key is not valid")
            if row.revoked_at is not None:
                raise NotFound(f"API key {row.id} was revoked")
            if row.expires_at is not None and row.expires_at <= now:
                raise NotFound(f"API key {row.id} expired")
            user = s.scalar(select(m.User).where(m.User.uid == row.user_id)) if row.user_id else None
            if user is None or user.removed_at is not None or user.disabled:
                raise NotFound(f"API key {row.id} acts for {row.user_name!r}, who no longer exists")
            if user.revoked_before is not None and row.created_at <= user.revoked_before:
                raise NotFound(f"API key {row.id} was revoked when its identity was removed")
            groups = list(row.groups)
            if row.kind == "agent":
                groups = list(user.groups)  # the person's rights, as they are now
                if user.source.startswith("oidc:") and confirm_within is not None and \
                        (user.seen_at or 0) < now - confirm_within:
                    raise NotFound(f"API key {row.id} acts for {user.name}, whose groups {user.source} has not "
                                   "confirmed lately: they sign in to Wardgate again (any request with their token), "
                                   "then the key works again")
            row.last_used_at = now
            return row, groups, user

    # ------------------------------------------------------------------------------- sessions

    def list_sessions(
        self, *, user: str | None = None, connection: str | None = None, status: str | None = None, limit: int = 50,
        since: float | None = None, until: float | None = None, outcome: str | None = None, rule: str | None = None,
        uid: str | None = None,
    ) -> list[tuple[m.Session, int]]:
        """Newest first. `uid`: the sessions of that identity (`user`: of whoever had that name). `outcome`: sessions with a statement that ended so (ok, error, denied, skipped,
        aborted); `rule`: sessions with a statement a rule of that name matched."""
        counts = (
            select(m.Statement.session_id, sa.func.count().label("n")).group_by(m.Statement.session_id).subquery()
        )
        q = select(m.Session, sa.func.coalesce(counts.c.n, 0)).outerjoin(counts, counts.c.session_id == m.Session.id)
        if uid is not None:
            q = q.where(self.owned_by(uid))
        if user:
            q = q.where(m.Session.user_name == user)
        if connection:
            q = q.where(m.Session.connection == connection)
        if status:
            q = q.where(m.Session.status == status)
        if since is not None:
            q = q.where(m.Session.started_at >= since)
        if until is not None:
            q = q.where(m.Session.started_at < until)
        st = m.Statement
        if outcome:
            q = q.where(sa.exists().where(st.session_id == m.Session.id, st.status == outcome))
        if rule:
            pattern = "%" + _dumps({"rule": rule})[1:-1].replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            q = q.where(sa.exists().where(st.session_id == m.Session.id,
                                          sa.cast(st.rules, sa.Text).like(pattern, escape="\\")))
        with self.Session() as s:
            return [(r, n) for r, n in s.execute(q.order_by(m.Session.started_at.desc()).limit(limit))]

    @staticmethod
    def owned_by(uid: str, ss: Any = None) -> Any:
        """The condition that a session (of table `ss`) is the identity `uid`'s. Sessions recorded before
        identities had ids name only a user: theirs if it is the one of that name who existed then."""
        ss = m.Session.__table__ if ss is None else ss
        us = m.User.__table__
        holder = select(us.c.name, us.c.created_at).where(us.c.uid == uid).subquery()
        return sa.or_(ss.c.user_id == uid, sa.and_(
            ss.c.user_id.is_(None),
            sa.exists().where(holder.c.name == ss.c.user_name, holder.c.created_at <= ss.c.started_at)))

    def session_owner(self, session: m.Session) -> str | None:
        """The uid of the identity a session is (see owned_by), or None."""
        if session.user_id:
            return session.user_id
        with self.Session() as s:
            return s.scalar(select(m.User.uid).where(m.User.name == session.user_name,
                                                     m.User.created_at <= session.started_at))

    @staticmethod
    def _find_session(s: Any, session_id: str) -> m.Session:
        row = s.get(m.Session, session_id)
        if row is None:
            matches = list(s.scalars(select(m.Session).where(m.Session.id.startswith(session_id)).limit(2)))
            if len(matches) != 1:
                raise NotFound(f"no session {session_id!r}; see `wardgate sessions list`")
            row = matches[0]
        return row

    def get_session(self, session_id: str) -> tuple[m.Session, list[m.Statement]]:
        with self.Session() as s:
            row = self._find_session(s, session_id)
            stmts = list(s.scalars(select(m.Statement).where(m.Statement.session_id == row.id).order_by(m.Statement.seq)))
            return row, stmts

    def session_row(self, session_id: str) -> m.Session:
        """A session without its statements (an id or a unique prefix of one)."""
        with self.Session() as s:
            return self._find_session(s, session_id)

    def statement_facts(self, session_id: str) -> list[tuple[str, float, str, str | None, int | None]]:
        """(text, started_at, status, decision, rows) of each statement of a session, in order: what the
        analysis reads, without building a record object per statement (sessions run to millions)."""
        st = m.Statement.__table__
        q = (select(st.c.text, st.c.started_at, st.c.status, st.c.decision, st.c.rows)
             .where(st.c.session_id == session_id).order_by(st.c.seq))
        with self.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(q)]  # type: ignore[misc]

    def reviews_of_session(self, session_id: str) -> list[str]:
        """The reviews whose approved statement this session ran."""
        with self.Session() as s:
            return list(s.scalars(select(m.Review.id).where(m.Review.session_id == session_id).order_by(m.Review.created_at)))

    def apply_records(self, records: list[dict[str, Any]]) -> None:
        """Apply journal records in one transaction, in batches. Idempotent: replaying after a crash is harmless.
        Every row part written is sealed into the audit chain (recording/seals.py) in the same transaction."""
        if not records:
            return
        sessions: dict[str, dict[str, Any]] = {}
        stmts: dict[tuple[str, int], list[Any]] = {}  # rows in _STMT_COLUMNS order
        starts: dict[tuple[str, int], dict[str, Any]] = {}  # their records, for their seals
        finished: list[dict[str, Any]] = []
        ends: list[dict[str, Any]] = []
        events: list[dict[str, Any]] = []
        statement_events: list[dict[str, Any]] = []  # about a session's statements: its user is looked up
        with_result: list[dict[str, Any]] = []  # outcomes of statements started in an earlier batch, with a result
        allowed: dict[str, list[tuple[int, str, str, float]]] = {}  # session -> (seq, digest, decision, at)
        sealed: list[tuple[str, int, str, str, str]] = []  # (session, number, part, digest, tags)
        for r in records:
            kind = r["k"]
            if kind == "stmt":
                sid, seq, at, text, params = r["sid"], r["seq"], r["at"], r["text"], r.get("p")
                decision = r.get("d", "allow")
                rules = r.get("r")
                stmts[(sid, seq)] = [
                    sid, seq, r["kind"], text, r["np"], at, "running", None, None, None, None, None,
                    decision, None if rules is None else _dumps(rules), None if params is None else _dumps(params), None,
                ]
                starts[(sid, seq)] = r
                if decision in ("allow", "approved", "shadow"):  # refusals have their own event, with the reason
                    digest = audit.statement_digest(text, params)
                    if sid in allowed:
                        allowed[sid].append((seq, digest, decision, at))
                    else:
                        allowed[sid] = [(seq, digest, decision, at)]
            elif kind == "done":
                result = r.get("res")  # the relay's: the result record as JSON text already
                if result is None and "cols" in r:
                    result = _dumps({"columns": r["cols"]} if "sample" not in r else
                                    {"columns": r["cols"], "sample": r["sample"]})
                row = stmts.get((r["sid"], r["seq"]))
                if row is not None:  # one insert
                    row[_OUTCOME] = r["status"], r.get("ms"), r.get("rows"), r.get("tag"), r.get("code"), r.get("msg")
                    row[_RESULT] = result
                    continue
                outcome = {"status": r["status"], "duration_ms": r.get("ms"), "rows": r.get("rows"),
                           "command_tag": r.get("tag"), "error_code": r.get("code"), "error_message": r.get("msg")}
                sealed.append((r["sid"], r["seq"], "outcome",
                               *seals.seal(r["sid"], r["seq"], "outcome", {**outcome, "result": result})))
                if result is not None:
                    with_result.append({"b_sid": r["sid"], "b_seq": r["seq"], "b_result": json.loads(result),
                                        **{f"b_{k}": v for k, v in outcome.items()}})
                else:
                    finished.append({"b_sid": r["sid"], "b_seq": r["seq"], **{f"b_{k}": v for k, v in outcome.items()}})
            elif kind == "session":
                sessions[r["sid"]] = {
                    "id": r["sid"], "user_name": r["user"], "user_id": r.get("uid"), "connection": r["conn"], "credential_id": r.get("cred"),
                    "client_addr": r["addr"], "started_at": r["at"], "status": r.get("status", "active"),
                    "end_reason": r.get("reason"), "error_code": r.get("code"), "ended_at": r.get("ended"),
                    "tls": bool(r.get("tls")), "application_name": r.get("app"), "gateway": r.get("gw"),
                    "agent": r.get("agent"),
                }
            elif kind == "end":
                ends.append({"b_sid": r["sid"], "b_at": r["at"], "b_reason": r.get("reason"), "b_code": r.get("code"),
                             "b_masked": r.get("masked")})
                sealed.append((r["sid"], seals.SESSION_ROW, "end", *seals.seal(r["sid"], seals.SESSION_ROW, "end", {
                    "status": "closed", "ended_at": r["at"], "end_reason": r.get("reason"), "error_code": r.get("code"),
                    "masked": r.get("masked")})))
                if r.get("masked"):
                    counts = ", ".join(f"{k}: {v}" for k, v in sorted(r["masked"].items()))
                    statement_events.append({"id": _event_id("masked", r["sid"]), "at": r["at"], "kind": "masking.applied",
                                             "outcome": "ok", "sid": r["sid"], "detail": f"values masked: {counts}"})
            elif kind == "event":
                events.append(_event_row(r))
        for sid, row in sessions.items():
            part = "session" if row["status"] == "active" else "session+end"
            sealed.append((sid, seals.SESSION_ROW, part, *seals.seal(sid, seals.SESSION_ROW, part, row)))
        for key, row in stmts.items():
            r = starts[key]
            values = {"kind": r["kind"], "text": r["text"], "param_count": r["np"], "started_at": r["at"],
                      "decision": row[12], "rules": r.get("r"), "params": r.get("p")}
            part = "statement"
            if row[6] != "running":
                part = "statement+outcome"
                values.update(zip(seals.STMT_OUTCOME, (*row[_OUTCOME], row[_RESULT]), strict=True))
            sealed.append((key[0], key[1], part, *seals.seal(key[0], key[1], part, values)))
        statement_events += self._allowed_events(allowed)
        st, ss = m.Statement.__table__, m.Session.__table__
        bp = sa.bindparam
        with self.engine.begin() as conn:
            if sessions:
                conn.execute(self._insert(ss).on_conflict_do_nothing(), list(sessions.values()))
            if stmts:
                # The hot insert goes to the driver as tuples: a statement a row, thousands a second.
                ph = "?" if conn.dialect.paramstyle == "qmark" else "%s"
                conn.exec_driver_sql(
                    f"INSERT INTO statements ({_STMT_COLUMN_LIST}) "
                    f"VALUES ({', '.join([ph] * len(_STMT_COLUMNS))}) ON CONFLICT DO NOTHING",
                    list(map(tuple, stmts.values())),
                )
            if finished:
                conn.execute(
                    update(st)
                    .where(st.c.session_id == bp("b_sid"), st.c.seq == bp("b_seq"))
                    .values({k: bp(f"b_{k}") for k in
                             ("status", "duration_ms", "rows", "command_tag", "error_code", "error_message")}),
                    finished,
                )
            if with_result:
                conn.execute(
                    update(st)
                    .where(st.c.session_id == bp("b_sid"), st.c.seq == bp("b_seq"))
                    .values({**{k: bp(f"b_{k}") for k in
                                ("status", "duration_ms", "rows", "command_tag", "error_code", "error_message")},
                             "result": bp("b_result", type_=sa.JSON)}),
                    with_result,
                )
            if ends:
                conn.execute(
                    update(ss).where(ss.c.id == bp("b_sid")).values(
                        ended_at=bp("b_at"), status="closed", end_reason=bp("b_reason"), error_code=bp("b_code"),
                        masked=bp("b_masked", type_=sa.JSON)
                    ),
                    ends,
                )
                sealed += self._abort_running(conn, ends)
            if statement_events:
                events = self._merge_session_events(conn, events, statement_events, sessions)
            seal_event = None
            if sealed:
                digest = seals.batch_digest(sealed)
                detail: dict[str, Any] = {"sealed": len(sealed), "sha256": digest}
                if not self._sealing:
                    detail.update(self._legacy(conn, sealed))
                seal_event = {"id": _event_id("seal", digest), "at": time.time(), "kind": seals.KIND, "outcome": "ok",
                              "user_name": None, "agent": None, "source": "recorder", "client_addr": None,
                              "detail": _dumps(detail)}
                events.append(seal_event)
            if events:
                self._append_events(conn, events)
            if seal_event is not None and "seq" in seal_event:  # new: a replayed batch's seals are there already
                ph = "?" if conn.dialect.paramstyle == "qmark" else "%s"
                conn.exec_driver_sql(
                    f"INSERT INTO seals (event_seq, n, session_id, seq, part, digest, tags) VALUES ({', '.join([ph] * 7)})",
                    [(seal_event["seq"], n, *s) for n, s in enumerate(sealed)])
        if sealed:
            self._sealing = True  # committed: the chain has its first seal event now (or had one before)

    def _legacy(self, conn: sa.Connection, sealed: list[tuple[str, int, str, str, str]]) -> dict[str, Any]:
        """For the chain's first `record.seal` event: the sessions recorded before rows were sealed (a
        store upgraded from an older version), as their count and the SHA-256 of their ids, so that none
        can be added among them later. Nothing when the chain has seal events already."""
        ev, ss = m.Event.__table__, m.Session.__table__
        if conn.execute(select(ev.c.seq).where(ev.c.kind == seals.KIND).limit(1)).first() is not None:
            return {}
        started = {sid for sid, seq, part, _, _ in sealed if seq == seals.SESSION_ROW and part in seals.STARTS}
        ids = sorted(set(conn.execute(select(ss.c.id)).scalars()) - started)
        return {"legacy": {"sessions": len(ids), "sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest()}}
    @staticmethod
    def _abort_running(conn: sa.Connection, ends: list[dict[str, Any]]) -> list[tuple[str, int, str, str, str]]:
        """Statements still running when their session ended are `aborted` (with the end's SQLSTATE, if
        it had one); the seals of that outcome."""
        st = m.Statement.__table__
        code = {e["b_sid"]: e["b_code"] for e in ends}
        ids = list(code)
        running: list[tuple[str, int]] = []
        for i in range(0, len(ids), 500):
            running += [tuple(r) for r in conn.execute(  # type: ignore[misc]
                select(st.c.session_id, st.c.seq).where(st.c.session_id.in_(ids[i:i + 500]), st.c.status == "running"))]
        if not running:
            return []
        bp = sa.bindparam
        conn.execute(update(st).where(st.c.session_id == bp("b_sid"), st.c.seq == bp("b_seq"))
                     .values(status="aborted", error_code=bp("b_code"), error_message=seals.ABORTED),
                     [{"b_sid": sid, "b_seq": seq, "b_code": code[sid]} for sid, seq in running])
        return [(sid, seq, "outcome", *seals.seal(sid, seq, "outcome", {
            "status": "aborted", "error_code": code[sid], "error_message": seals.ABORTED})) for sid, seq in running]

    @staticmethod
    def _allowed_events(allowed: dict[str, list[tuple[int, str, str, float]]]) -> list[dict[str, Any]]:
        """Allowed statements join the chain in groups: one `statement.allow` event per session per up to
        200 statements, listing each one's number, digest (audit.statement_digest) and decision. The
        chain then vouches for every statement's text and values, which `audit verify` checks against
        the session records, without the texts themselves entering the log (retention can remove them)."""
        out = []
        for sid, items in allowed.items():
            for i in range(0, len(items), audit.STATEMENTS_PER_EVENT):
                part = items[i:i + audit.STATEMENTS_PER_EVENT]
                out.append({
                    "id": _event_id("allowed", sid, part[0][0], part[-1][0]), "at": part[-1][3], "kind": "statement.allow",
                    "outcome": "allow", "sid": sid,
                    "detail": _dumps({"statements": [[seq, digest, decision] for seq, digest, decision, _ in part]}),
                })
        return out

    @staticmethod
    def _merge_session_events(conn: sa.Connection, events: list[dict[str, Any]], about: list[dict[str, Any]],
                              sessions: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        """Give events about a session's statements the session's user and agent, and merge them with
        the other events in time order (the chain follows what happened)."""
        who = {sid: (row["user_name"], row["agent"]) for sid, row in sessions.items()}
        missing = {e["sid"] for e in about} - who.keys()
        if missing:
            ss = m.Session.__table__
            for sid, user, agent in conn.execute(select(ss.c.id, ss.c.user_name, ss.c.agent).where(ss.c.id.in_(missing))):
                who[sid] = (user, agent)
        for e in about:
            sid = e.pop("sid")
            user, agent = who.get(sid, (None, None))
            e.update(user_name=user, agent=agent, source=f"session:{sid}", client_addr=None)
        return sorted(events + about, key=lambda e: e["at"])

    @property
    def signer(self) -> audit.Signer:
        """The checkpoint signing key, shared by every replica through the store (encrypted with the
        secret key, which the store never holds): the first gateway to start makes it, or adopts the
        PEM file an older single gateway kept in its data directory."""
        if self._signer is None:
            with self.engine.begin() as conn:
                return self._load_signer(conn)
        return self._signer

    def _load_signer(self, conn: sa.Connection) -> audit.Signer:
        """`signer`, read (or made) on `conn`: inside a transaction that writes, on its own connection it
        would wait for that very transaction (SQLite has one writer)."""
        if self._signer is None:
            kt = m.Key.__table__
            row = conn.execute(select(kt.c.value_enc).where(kt.c.name == "audit-signing")).first()
            if row is None:
                legacy = self.settings.data_dir / "audit-ed25519.pem"
                made = audit.Signer.from_pem(legacy.read_bytes()) if legacy.exists() else audit.Signer.generate()
                conn.execute(self._insert(kt).on_conflict_do_nothing(), {
                    "name": "audit-signing", "value_enc": self.box.encrypt(made.pem().decode()), "created_at": time.time()})
                row = conn.execute(select(kt.c.value_enc).where(kt.c.name == "audit-signing")).one()
            try:
                self._signer = audit.Signer.from_pem(self.box.decrypt(row[0]).encode())
            except (SecretError, ValueError) as exc:
                raise SecretError(f"the audit signing key in the store cannot be used ({exc}); it was written "
                                  "without this gateway's secret key") from None
        return self._signer

    def _append_events(self, conn: sa.Connection, events: list[dict[str, Any]]) -> None:
        """Chain and insert events not yet recorded (a replayed journal repeats some), then sign the new head."""
        ev, head = m.Event.__table__, m.AuditHead.__table__
        known = set(conn.execute(select(ev.c.id).where(ev.c.id.in_([e["id"] for e in events]))).scalars())
        new = [e for e in events if e["id"] not in known]
        if not new:
            return
        # Taking the head's row lock first makes concurrent writers append one after the other.
        conn.execute(update(head).where(head.c.id == 1).values(seq=head.c.seq))
        row = conn.execute(select(head.c.seq, head.c.hash).where(head.c.id == 1)).one()
        seq, last = audit.chain(new, row.seq, row.hash)
        # To the driver as tuples: with a statement a row, thousands a second reach this insert.
        ph = "?" if conn.dialect.paramstyle == "qmark" else "%s"
        conn.exec_driver_sql(f"INSERT INTO events ({_EVENT_COLUMN_LIST}) VALUES ({', '.join([ph] * len(_EVENT_COLUMNS))})",
                             [tuple(e.get(c) for c in _EVENT_COLUMNS) for e in new])
        conn.execute(update(head).where(head.c.id == 1).values(seq=seq, hash=last))
        signer = self._load_signer(conn)
        conn.execute(sa.insert(m.AuditCheckpoint.__table__),
                     {"seq": seq, "hash": last, "at": time.time(), "signature": signer.sign(seq, last), "key_id": signer.key_id})

    def audit_verify(self, anchors: list[dict[str, Any]] | None = None) -> audit.Verdict:
        """The chain, its checkpoints and head, then every recorded row against its seals; with `anchor`
        (a signed checkpoint kept outside the store), also that the store's chain still reaches it."""
        ev = m.Event.__table__
        cols = [ev.c[c] for c in (*audit.FIELDS, "seq", "prev_hash", "hash")]
        with self.engine.connect() as conn:
            if conn.dialect.name == "sqlite":
                conn.exec_driver_sql("BEGIN")  # one snapshot for every read below, while the recorder writes on
            else:
                conn = conn.execution_options(isolation_level="REPEATABLE READ")
            checkpoints = [dict(r._mapping) for r in conn.execute(select(m.AuditCheckpoint.__table__).order_by("seq"))]
            head = conn.execute(select(m.AuditHead.seq, m.AuditHead.hash).where(m.AuditHead.id == 1)).one_or_none()
            rows = conn.execute(select(*cols).order_by(ev.c.seq)).mappings()
            verdict = audit.verify((dict(r) for r in rows), checkpoints, tuple(head) if head else None,
                                   self.signer.public_pem, anchors or [])
            if verdict.ok:
                verdict = self._verify_seals(conn, verdict)
            if verdict.ok:
                verdict = self._verify_statements(conn, verdict)
            conn.rollback()
            return verdict

    def _verify_seals(self, conn: sa.Connection, verdict: audit.Verdict) -> audit.Verdict:
        """Every batch of seals is the one its `record.seal` event commits to, and every session and
        statement row matches its seals (recording/seals.py); the first finding (in chain order) is named."""
        ev, sl, ss, st = m.Event.__table__, m.Seal.__table__, m.Session.__table__, m.Statement.__table__
        committed = {seq: json.loads(detail) for seq, detail in
                     conn.execute(select(ev.c.seq, ev.c.detail).where(ev.c.kind == seals.KIND).order_by(ev.c.seq))}
        problems: list[seals.Problem] = []
        batches = conn.execute(select(sl.c.event_seq, sl.c.session_id, sl.c.seq, sl.c.part, sl.c.digest, sl.c.tags)
                               .order_by(sl.c.event_seq, sl.c.n))
        seen = set()
        for event_seq, group in itertools.groupby(batches, key=lambda r: r[0]):
            items = [tuple(r[1:]) for r in group]
            seen.add(event_seq)
            want = committed.get(event_seq)
            if want is None or want.get("sealed") != len(items) or want.get("sha256") != seals.batch_digest(items):
                sid = items[0][0]
                problems.append(seals.Problem(
                    f"the seals of audit event seq {event_seq} were changed, added or removed in the store" if want else
                    f"{len(items)} seal(s) at event seq {event_seq} are not committed by the audit chain (added)",
                    sid, event_seq=event_seq))
        for event_seq in committed.keys() - seen:
            problems.append(seals.Problem(f"the seals of audit event seq {event_seq} were removed from the store", "",
                                          event_seq=event_seq))
        if problems:
            return self._verdict_of(verdict, problems, 0)
        purged, purge_problems = self._purged_sessions(conn)
        problems += purge_problems
        rows = set(conn.execute(select(ss.c.id)).scalars())
        ids = sorted(rows | set(conn.execute(select(sl.c.session_id).distinct()).scalars())
                     | set(conn.execute(select(st.c.session_id).distinct()).scalars()))
        # Sessions with no seal of their start are those recorded before rows were sealed, which the
        # chain's first seal event lists (by count and digest); any other is a finding of its own.
        opened = set(conn.execute(select(sl.c.session_id).where(sl.c.seq == seals.SESSION_ROW,
                                                                 sl.c.part.in_(seals.STARTS)).distinct()).scalars())
        unsealed = sorted(rows - opened)
        legacy: set[str] = set()
        if committed:
            listed = committed[min(committed)].get("legacy", {"sessions": 0, "sha256": hashlib.sha256(b"").hexdigest()})
            if hashlib.sha256("\n".join(unsealed).encode()).hexdigest() == listed.get("sha256"):
                legacy = set(unsealed)
            elif listed.get("sessions"):
                problems.append(seals.Problem(
                    f"the sessions recorded before rows were sealed are not the {listed['sessions']} the audit chain "
                    f"lists ({len(unsealed)} now): one was added to the store or removed", unsealed[0] if unsealed else ""))
        else:
            legacy = set(unsealed)  # no row has been sealed yet
        checked = 0
        for i in range(0, len(ids), 200):
            chunk = ids[i:i + 200]
            sessions = {r["id"]: r for r in conn.execute(select(ss).where(ss.c.id.in_(chunk))).mappings()}
            statements: dict[str, dict[int, Any]] = {}
            for r in conn.execute(select(st).where(st.c.session_id.in_(chunk))).mappings():
                statements.setdefault(r["session_id"], {})[r["seq"]] = r
            sealed: dict[str, list[seals.Seal]] = {}
            for r in conn.execute(select(sl.c.session_id, sl.c.event_seq, sl.c.seq, sl.c.part, sl.c.digest, sl.c.tags)
                                  .where(sl.c.session_id.in_(chunk)).order_by(sl.c.event_seq, sl.c.n)):
                sealed.setdefault(r[0], []).append(tuple(r[1:]))  # type: ignore[arg-type]
            for sid in chunk:
                row = sessions.get(sid)
                problems += seals.check_session(sid, row, statements.get(sid, {}), sealed.get(sid, []),
                                                purged=sid in purged, legacy=sid in legacy)
                checked += len(statements.get(sid, {}))
        return self._verdict_of(verdict, problems, checked)

    @staticmethod
    def _verdict_of(verdict: audit.Verdict, problems: list[seals.Problem], rows: int) -> audit.Verdict:
        verdict.rows = rows
        if not problems:
            return verdict
        problems.sort(key=lambda p: (p.event_seq is None, p.event_seq or 0))
        first = problems[0]
        verdict.ok, verdict.problem, verdict.seq = False, first.message, first.event_seq
        verdict.findings = [p.public() for p in problems[:50]]
        verdict.findings_total = len(problems)
        return verdict

    @staticmethod
    def _purged_sessions(conn: sa.Connection) -> tuple[set[str], list[seals.Problem]]:
        """The sessions whose statements retention removed, as the chain's `retention.purge` events say
        (each holds the SHA-256 of the ids it emptied), not as the rows' own `purged_at` say."""
        ev, ss = m.Event.__table__, m.Session.__table__
        digests = set()
        for (detail,) in conn.execute(select(ev.c.detail).where(ev.c.kind == "retention.purge")):
            digests.update(re.findall(r"sessions sha256:([0-9a-f]{64})", detail or ""))
        groups: dict[float, list[tuple[float, str]]] = {}
        for sid, at, started in conn.execute(select(ss.c.id, ss.c.purged_at, ss.c.started_at).where(ss.c.purged_at.is_not(None))):
            groups.setdefault(at, []).append((started, sid))
        purged: set[str] = set()
        problems = []
        for group in groups.values():
            by_start = [sid for _, sid in sorted(group)]
            if {hashlib.sha256("\n".join(order).encode()).hexdigest() for order in (sorted(by_start), by_start)} & digests:
                purged.update(by_start)
            else:
                problems.append(seals.Problem(f"session(s) {', '.join(by_start[:5])} are marked purged, but no purge in the "
                                              "audit chain emptied them", by_start[0], fields=["purged_at"]))
        return purged, problems

    def _verify_statements(self, conn: sa.Connection, verdict: audit.Verdict) -> audit.Verdict:
        """The chain vouches for allowed statements by digest: each recorded statement must still match
        (a purged one is simply gone; a changed or swapped one is not)."""
        ev, st = m.Event.__table__, m.Statement.__table__
        q = select(ev.c.id, ev.c.seq, ev.c.source, ev.c.detail).where(ev.c.kind == "statement.allow").order_by(ev.c.seq)
        checked = 0
        for event_id, seq, source, detail in conn.execute(q):
            sid = source.split(":", 1)[1]
            listed = {n: digest for n, digest, _ in json.loads(detail)["statements"]}
            found = conn.execute(select(st.c.seq, st.c.text, st.c.params)
                                 .where(st.c.session_id == sid, st.c.seq.in_(list(listed))))
            for n, text, params in found:
                if isinstance(params, str):  # a JSON column read back raw by some drivers
                    params = json.loads(params)
                if audit.statement_digest(text, params) != listed[n]:
                    return audit.Verdict(False, verdict.events, verdict.checkpoints, verdict.head_seq,
                                         f"statement {n} of session {sid} was changed after it was recorded "
                                         f"(its digest is in audit event seq {seq})", event_id, seq)
                checked += 1
        verdict.statements = checked
        return verdict

    def iter_events(self, since: float = 0.0, batch: int = 1000) -> Iterable[m.Event]:
        """Events in chain order (oldest first) after `since`, read in batches."""
        after = 0
        while True:
            with self.Session() as s:
                rows = list(s.scalars(select(m.Event).where(m.Event.seq > after, m.Event.at >= since)
                                      .order_by(m.Event.seq).limit(batch)))
            yield from rows
            if len(rows) < batch:
                return
            after = rows[-1].seq

    def events_after(self, seq: int, limit: int) -> list[m.Event]:
        """The next `limit` events of the chain after `seq`, in order."""
        with self.Session() as s:
            return list(s.scalars(select(m.Event).where(m.Event.seq > seq).order_by(m.Event.seq).limit(limit)))

    def event_hash(self, seq: int) -> str | None:
        """The chain's hash at `seq`, if the store has that event."""
        ev = m.Event.__table__
        with self.engine.connect() as conn:
            return conn.execute(select(ev.c.hash).where(ev.c.seq == seq)).scalar()

    def checkpoint_upto(self, seq: int | None = None) -> dict[str, Any] | None:
        """The newest signed checkpoint (at or before `seq`), as anchors keep it."""
        cp = m.AuditCheckpoint.__table__
        q = select(cp).order_by(cp.c.seq.desc()).limit(1)
        if seq is not None:
            q = q.where(cp.c.seq <= seq)
        with self.engine.connect() as conn:
            row = conn.execute(q).mappings().first()
        return None if row is None else dict(row)

    def audit_head(self) -> int:
        with self.Session() as s:
            return s.scalar(select(m.AuditHead.seq).where(m.AuditHead.id == 1)) or 0

    def sink_cursors(self) -> dict[str, tuple[int, float]]:
        with self.Session() as s:
            return {c.name: (c.seq, c.at) for c in s.scalars(select(m.AuditSinkCursor))}

    def set_sink_cursor(self, name: str, seq: int) -> None:
        """Remember that a sink accepted every event up to `seq` (cursors only move forward)."""
        t = m.AuditSinkCursor.__table__
        stmt = self._insert(t).values(name=name, seq=seq, at=time.time())
        stmt = stmt.on_conflict_do_update(index_elements=[t.c.name], set_={"seq": sa.func.max(t.c.seq, seq)
                                          if self.engine.dialect.name == "sqlite" else sa.func.greatest(t.c.seq, seq),
                                          "at": stmt.excluded.at})
        with self.engine.begin() as conn:
            conn.execute(stmt)

    def list_events(self, *, kind: str | None = None, outcome: str | None = None, limit: int = 100) -> list[m.Event]:
        q = select(m.Event).order_by(m.Event.at.desc()).limit(limit)
        if kind:
            q = q.where(m.Event.kind == kind)
        if outcome:
            q = q.where(m.Event.outcome == outcome)
        with self.Session() as s:
            return list(s.scalars(q))

    # ---------------------------------------------------------------------------- console state

    def console_put(self, key: str, data: dict[str, Any], expires_at: float, user_name: str | None = None,
                    uid: str | None = None) -> None:
        """Keep a piece of console state (a signed-in session, a pending sign-in) until `expires_at`."""
        ct = m.ConsoleState.__table__
        with self.engine.begin() as conn:
            conn.execute(ct.delete().where(ct.c.key == key))
            conn.execute(ct.insert(), {"key": key, "user_name": user_name, "user_id": uid, "data": data,
                                       "expires_at": expires_at})

    def console_get(self, key: str) -> dict[str, Any] | None:
        ct = m.ConsoleState.__table__
        with self.engine.connect() as conn:
            row = conn.execute(select(ct.c.data).where(ct.c.key == key, ct.c.expires_at > time.time())).first()
        return None if row is None else row[0]

    def console_update(self, key: str, data: dict[str, Any]) -> None:
        ct = m.ConsoleState.__table__
        with self.engine.begin() as conn:
            conn.execute(update(ct).where(ct.c.key == key).values(data=data))

    def console_take(self, key: str) -> dict[str, Any] | None:
        """Remove and return a piece of state; of two replicas taking the same key, one gets it."""
        ct = m.ConsoleState.__table__
        with self.engine.begin() as conn:
            row = conn.execute(select(ct.c.data, ct.c.expires_at).where(ct.c.key == key)).first()
            if row is None or conn.execute(ct.delete().where(ct.c.key == key)).rowcount != 1:
                return None
        return row[0] if row[1] > time.time() else None

    def console_claim(self, key: str, expires_at: float) -> bool:
        """Mark `key` used (a one-time sign-in link's nonce): True the first time, False ever after, on
        any replica, for as long as the link could be valid."""
        ct = m.ConsoleState.__table__
        with self.engine.begin() as conn:
            # RETURNING says whether the row went in (an INSERT's rowcount is not reliable across drivers)
            done = conn.execute(self._insert(ct).values(key=key, user_name=None, data={}, expires_at=expires_at)
                                .on_conflict_do_nothing().returning(ct.c.key))
            return done.first() is not None

    def console_drop(self, key: str | None = None, *, uid: str | None = None) -> int:
        """Forget one piece of state, or everything of an identity's (their console sessions end)."""
        ct = m.ConsoleState.__table__
        q = ct.delete().where(ct.c.key == key) if key is not None else ct.delete().where(ct.c.user_id == uid)
        with self.engine.begin() as conn:
            return conn.execute(q).rowcount

    def console_purge(self, now: float | None = None) -> int:
        ct = m.ConsoleState.__table__
        with self.engine.begin() as conn:
            return conn.execute(ct.delete().where(ct.c.expires_at < (now or time.time()))).rowcount

    # ---------------------------------------------------------------------------- exec results

    def put_exec_result(self, session_id: str, user_name: str, envelope: dict[str, Any], expires_at: float,
                        uid: str | None = None) -> None:
        """Keep an exec's final envelope until `expires_at` (and forget those past theirs); every replica
        hears of it at once."""
        et = m.ExecResult.__table__
        with self.engine.begin() as conn:
            conn.execute(et.delete().where(sa.or_(et.c.session_id == session_id, et.c.expires_at < time.time())))
            conn.execute(et.insert(), {"session_id": session_id, "user_name": user_name, "user_id": uid, "envelope": envelope,
                                       "expires_at": expires_at})
            self.announce(conn, "exec", session_id)

    def get_exec_result(self, session_id: str) -> dict[str, Any] | None:
        et = m.ExecResult.__table__
        with self.engine.connect() as conn:
            row = conn.execute(select(et.c.envelope).where(et.c.session_id == session_id,
                                                           et.c.expires_at > time.time())).first()
        return None if row is None else row[0]

    # --------------------------------------------------------------------------------- dashboard

    def daily_counts(self, days: int, uid: str | None = None) -> dict[str, dict[int, int]]:
        """Per UTC day (days since the epoch) over the last `days`: sessions, refused statements, reviews
        asked for and values masked; `uid` limits it to one identity's."""
        since = (int(time.time() // 86400) - days + 1) * 86400
        ss, st, rv = m.Session.__table__, m.Statement.__table__, m.Review.__table__

        def day(col: Any) -> Any:  # whole days since the epoch: PostgreSQL's cast rounds, SQLite's truncates
            days = col / 86400
            return (sa.func.floor(days) if self.engine.dialect.name == "postgresql" else sa.cast(days, sa.Integer)).label("day")

        out: dict[str, dict[int, int]] = {}
        with self.engine.connect() as conn:
            q = select(day(ss.c.started_at), sa.func.count()).where(ss.c.started_at >= since)
            q = q.where(self.owned_by(uid, ss)) if uid is not None else q
            out["sessions"] = dict(conn.execute(q.group_by("day")).all())
            q = (select(day(st.c.started_at), sa.func.count()).select_from(st.join(ss, ss.c.id == st.c.session_id))
                 .where(st.c.started_at >= since, st.c.status == "denied"))
            q = q.where(self.owned_by(uid, ss)) if uid is not None else q
            out["refused"] = dict(conn.execute(q.group_by("day")).all())
            q = select(day(rv.c.created_at), sa.func.count()).where(rv.c.created_at >= since)
            q = q.where(rv.c.requester_id == uid) if uid is not None else q
            out["reviews"] = dict(conn.execute(q.group_by("day")).all())
            q = select(ss.c.started_at, ss.c.masked).where(ss.c.started_at >= since, ss.c.masked.is_not(None))
            q = q.where(self.owned_by(uid, ss)) if uid is not None else q
            masked: dict[int, int] = {}
            for at, counts in conn.execute(q):
                if isinstance(counts, str):
                    counts = json.loads(counts)
                masked[int(at // 86400)] = masked.get(int(at // 86400), 0) + sum((counts or {}).values())
            out["masked"] = masked
        return out

    # --------------------------------------------------------------------------------- retention

    def purge_sessions(self, before: float, actor: Actor, dry_run: bool = False) -> dict[str, Any]:
        """Remove the content of sessions that ended before `before`: their statements (texts, values,
        results) and the detail of their analyses. Who, when and where stay, and the audit log records
        the purge, so the chain stays whole and says what is gone."""
        ss, st, an = m.Session.__table__, m.Statement.__table__, m.Analysis.__table__
        with self.engine.begin() as conn:
            ids = list(conn.execute(select(ss.c.id).where(ss.c.ended_at < before, ss.c.purged_at.is_(None))
                                    .order_by(ss.c.started_at)).scalars())
            statements = conn.execute(select(sa.func.count()).select_from(st).where(st.c.session_id.in_(ids))).scalar() \
                if ids else 0
            summary = {"sessions": len(ids), "statements": int(statements or 0), "before": before}
            if dry_run or not ids:
                return summary
            now = time.time()
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                conn.execute(sa.delete(st).where(st.c.session_id.in_(chunk)))
                conn.execute(update(an).where(an.c.session_id.in_(chunk)).values(
                    explanation="(purged by retention)", findings=[]))
                conn.execute(update(ss).where(ss.c.id.in_(chunk)).values(purged_at=now))
                conn.execute(sa.delete(m.ExecResult.__table__).where(m.ExecResult.__table__.c.session_id.in_(chunk)))
            self.announce(conn, "purge", repr(before))  # replicas drop results they keep in memory
            listed = ", ".join(ids[:50]) + (f", … ({len(ids) - 50} more)" if len(ids) > 50 else "")
            digest = hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()
            detail = (f"content of {len(ids)} session(s) that ended before "
                      f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(before))} removed: {summary['statements']} "
                      f"statement(s); sessions sha256:{digest}: {listed}")
            self.record_change(conn, actor, "retention.purge", detail)
            return summary

    # ---------------------------------------------------------------------------------- analysis

    def unanalyzed_sessions(self, limit: int) -> list[str]:
        """Closed sessions without an analysis, oldest first."""
        a = m.Analysis.__table__
        q = (select(m.Session.id).outerjoin(a, a.c.session_id == m.Session.id)
             .where(m.Session.status == "closed", a.c.session_id.is_(None)).order_by(m.Session.started_at).limit(limit))
        with self.Session() as s:
            return list(s.scalars(q))

    def user_rows_history(self, uid: str, *, before: float, sessions: int) -> list[int]:
        """Rows returned in each of the identity's last `sessions` closed sessions before `before`."""
        recent = (select(m.Session.id).where(self.owned_by(uid), m.Session.status == "closed",
                                             m.Session.started_at < before)
                  .order_by(m.Session.started_at.desc()).limit(sessions).subquery())
        q = (select(recent.c.id, sa.func.coalesce(sa.func.sum(m.Statement.rows), 0))
             .outerjoin(m.Statement, m.Statement.session_id == recent.c.id).group_by(recent.c.id))
        with self.Session() as s:
            return [int(n) for _, n in s.execute(q)]

    def recent_refusals(self, uid: str, since: float) -> int:
        q = (select(sa.func.count()).select_from(m.Statement).join(m.Session, m.Session.id == m.Statement.session_id)
             .where(self.owned_by(uid), m.Statement.started_at >= since, m.Statement.status == "denied"))
        with self.Session() as s:
            return int(s.scalar(q) or 0)

    def add_session_analysis(self, session_id: str, analysis: Any, event: dict[str, Any] | None) -> bool:
        """A closed session's analysis, once: replicas that analyse the same session keep the first, and
        only it adds its event (a journal-style record) to the audit chain. True if this one was kept."""
        row = {"session_id": session_id, "level": analysis.level, "title": analysis.title,
               "explanation": analysis.explanation, "findings": [f.public() for f in analysis.findings],
               "source": analysis.source, "at": time.time()}
        with self.engine.begin() as conn:
            at = m.Analysis.__table__
            done = conn.execute(self._insert(at).values(row).on_conflict_do_nothing().returning(at.c.session_id))
            if done.first() is None:
                return False
            if event is not None:
                self._append_events(conn, [_event_row(event)])
            return True

    def get_analysis(self, session_id: str) -> dict[str, Any] | None:
        with self.Session() as s:
            a = s.get(m.Analysis, session_id)
            if a is None:
                return None
            return {"level": a.level, "title": a.title, "explanation": a.explanation, "findings": a.findings,
                    "source": a.source, "analyzed_at": a.at}

    def close_sessions_of(self, dead: list[tuple[str, int]]) -> int:
        """End the sessions still marked active that gateway processes which ended held: as records, so
        that each end is sealed and has its `session.end` event (reason: gateway restarted)."""
        instances = [name for name, _ in dead]
        ss = m.Session.__table__
        with self.engine.connect() as conn:
            rows = conn.execute(select(ss.c.id, ss.c.user_name, ss.c.agent, ss.c.client_addr)
                                .where(ss.c.status == "active", ss.c.gateway.in_(instances))).all()
        now = time.time()
        self.apply_records([rec for sid, user, agent, addr in rows
                            for rec in ends_after_restart({"sid": sid, "user": user, "agent": agent, "addr": addr}, now)])
        return len(rows)

    # ---------------------------------------------------------------------------------- reviews

    def create_review(self, review: m.Review) -> m.Review:
        with self.Session.begin() as s:
            s.add(review)
        return review

    def get_review(self, review_id: str) -> tuple[m.Review, list[m.ReviewDecision]]:
        with self.Session() as s:
            review = s.get(m.Review, review_id)
            if review is None:
                raise NotFound(f"no review {review_id!r}")
            steps = list(s.scalars(select(m.ReviewDecision).where(m.ReviewDecision.review_id == review_id)
                                   .order_by(m.ReviewDecision.id)))
            return review, steps

    def list_reviews(self, *, status: str | None = None, requester: str | None = None, limit: int = 100,
                     requester_id: str | None = None) -> list[m.Review]:
        with self.Session() as s:
            q = select(m.Review).order_by(m.Review.created_at.desc()).limit(limit)
            if status:
                q = q.where(m.Review.status == status)
            if requester:
                q = q.where(m.Review.requester == requester)
            if requester_id:
                q = q.where(m.Review.requester_id == requester_id)
            return list(s.scalars(q))

    def decide_review(self, review_id: str, by: str, decision: str, reason: str | None, new_status: str | None,
                      expect: tuple[str, ...], now: float, by_id: str | None = None, **values: Any) -> bool:
        """Record one person's step and, with `new_status`, move the review on; False when the review is
        no longer in one of the `expect`ed states (someone else got there first)."""
        with self.Session.begin() as s:
            if new_status is not None:
                done = s.execute(update(m.Review).where(m.Review.id == review_id, m.Review.status.in_(expect))
                                 .values(status=new_status, decided_at=now, **values))
                if done.rowcount != 1:
                    return False
            elif s.scalar(select(m.Review.status).where(m.Review.id == review_id)) not in expect:
                return False
            s.add(m.ReviewDecision(review_id=review_id, by=by, by_id=by_id, decision=decision, reason=reason, at=now))
            self.announce(s, "review", review_id)
        return True

    def claim_review(self, review_id: str, requester_id: str, agent: str | None, now: float,
                     agent_id: str | None = None) -> bool:
        """Approved, unexpired, the requester's (and the same agent's), never run: mark it executed in one
        step (at most once)."""
        with self.Session.begin() as s:
            done = s.execute(update(m.Review).where(
                m.Review.id == review_id, m.Review.kind == "statement", m.Review.status == "approved",
                m.Review.requester_id == requester_id, _same_agent(agent, agent_id), m.Review.expires_at > now,
            ).values(status="executed", executed_at=now))
            if done.rowcount == 1:
                self.announce(s, "review", review_id)
            return done.rowcount == 1

    def set_review_session(self, review_id: str, session_id: str) -> None:
        with self.Session.begin() as s:
            s.execute(update(m.Review).where(m.Review.id == review_id).values(session_id=session_id))

    def expire_reviews(self, now: float) -> list[str]:
        with self.Session.begin() as s:
            # An approved grant is governed by its window, not by the review's expiry.
            open_ = sa.or_(m.Review.status == "pending", sa.and_(m.Review.status == "approved", m.Review.kind == "statement"))
            ids = list(s.scalars(select(m.Review.id).where(open_, m.Review.expires_at <= now)))
            if ids:
                s.execute(update(m.Review).where(m.Review.id.in_(ids), open_).values(status="expired"))
                for review_id in ids:
                    self.announce(s, "review", review_id)
            return ids

    def claim_approved(self, requester_id: str, agent: str | None, connection: str, sha256: str, policy_version: str,
                       now: float, agent_id: str | None = None) -> str | None:
        """An approved, unexpired review of exactly this input asked for by this identity and agent, marked
        executed in the same step; its id."""
        with self.Session.begin() as s:
            ids = list(s.scalars(select(m.Review.id).where(
                m.Review.kind == "statement", m.Review.requester_id == requester_id, _same_agent(agent, agent_id),
                m.Review.connection == connection,
                m.Review.sha256 == sha256, m.Review.status == "approved", m.Review.expires_at > now,
                m.Review.policy_version == policy_version,
            ).order_by(m.Review.created_at)))
            for review_id in ids:
                done = s.execute(update(m.Review).where(m.Review.id == review_id, m.Review.status == "approved")
                                 .values(status="executed", executed_at=now))
                if done.rowcount == 1:
                    self.announce(s, "review", review_id)
                    return review_id
            return None

    def pending_review(self, requester_id: str, agent: str | None, connection: str, sha256: str,
                       now: float, agent_id: str | None = None) -> m.Review | None:
        with self.Session() as s:
            return s.scalar(select(m.Review).where(
                m.Review.kind == "statement", m.Review.requester_id == requester_id, _same_agent(agent, agent_id),
                m.Review.connection == connection,
                m.Review.sha256 == sha256, m.Review.status == "pending", m.Review.expires_at > now,
            ).order_by(m.Review.created_at.desc()).limit(1))

    def active_grants(self, uid: str, now: float | None = None) -> dict[str, float]:
        """The identity's approved access windows that have not ended: connection -> end."""
        now = time.time() if now is None else now
        if not uid:
            return {}
        with self.Session() as s:
            rows = s.execute(select(m.Review.connection, m.Review.window_end).where(
                m.Review.kind == "access", m.Review.requester_id == uid, m.Review.status == "approved",
                m.Review.window_end > now,
            ))
            out: dict[str, float] = {}
            for connection, end in rows:
                out[connection] = max(end, out.get(connection, 0.0))
            return out

    def revoke_credentials_since(self, uid: str, connection: str, since: float) -> list[str]:
        """Revoke the identity's live credentials for `connection` issued at or after `since`; their ids."""
        now = time.time()
        with self.Session.begin() as s:
            user_id = s.scalar(select(m.User.id).where(m.User.uid == uid))
            if user_id is None:
                return []
            ids = list(s.scalars(select(m.Credential.id).where(
                m.Credential.user_id == user_id, m.Credential.connection == connection, m.Credential.created_at >= since,
                m.Credential.revoked_at.is_(None), m.Credential.expires_at > now,
            )))
            if ids:
                s.execute(update(m.Credential).where(m.Credential.id.in_(ids)).values(revoked_at=now))
                for cred_id in ids:
                    self.announce(s, "credential", cred_id)
            return ids
