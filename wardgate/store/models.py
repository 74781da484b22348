"""Tables of the store. Times are UNIX epoch seconds (float), so SQLite and PostgreSQL agree."""

from __future__ import annotations

from sqlalchemy import JSON, Boolean, Float, ForeignKey, Index, Integer, LargeBinary, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    groups: Mapped[list] = mapped_column(JSON, default=list)
    scram_salt: Mapped[bytes] = mapped_column(LargeBinary(32))
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[float] = mapped_column(Float)
    # local (added with `wardgate users add`) or oidc:<provider> (seen first in a verified token)
    source: Mapped[str] = mapped_column(String(64), default="local", server_default="local")
    # The stable id every record of this identity names; a later user of the same name has another.
    uid: Mapped[str] = mapped_column(String(32), unique=True)
    kind: Mapped[str] = mapped_column(String(16), default="user", server_default="user")  # user or service
    # oidc: the token claim that keys the person ([[identity_providers]] subject_claim, `sub` by default).
    subject: Mapped[str | None] = mapped_column(String(255), nullable=True)
    removed_at: Mapped[float | None] = mapped_column(Float, nullable=True)  # refused everywhere until restored
    seen_at: Mapped[float | None] = mapped_column(Float, nullable=True)  # oidc: groups last confirmed by a token
    # Unique among live users (NULL once removed): names that read alike are one name (wardgate/names.py).
    name_key: Mapped[str | None] = mapped_column(String(64), nullable=True, unique=True, index=True)
    former_name: Mapped[str | None] = mapped_column(String(255), nullable=True)  # a removed user's name
    # What was issued before this (credentials, API keys, sign-in links) is dead, a restore notwithstanding.
    revoked_before: Mapped[float | None] = mapped_column(Float, nullable=True)


class Connection(Base):
    __tablename__ = "connections"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    host: Mapped[str] = mapped_column(String(255))
    port: Mapped[int] = mapped_column(Integer)
    database: Mapped[str] = mapped_column(String(63))
    username: Mapped[str] = mapped_column(String(63))
    password_enc: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    password_env: Mapped[str | None] = mapped_column(String(255), nullable=True)
    sslmode: Mapped[str] = mapped_column(String(16), default="prefer")
    sslrootcert: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    password_auth: Mapped[str] = mapped_column(String(16), default="scram-sha-256", server_default="scram-sha-256")


class Credential(Base):
    __tablename__ = "credentials"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    connection: Mapped[str] = mapped_column(String(63))
    iterations: Mapped[int] = mapped_column(Integer)
    stored_key: Mapped[bytes] = mapped_column(LargeBinary(32))
    server_key: Mapped[bytes] = mapped_column(LargeBinary(32))
    created_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float] = mapped_column(Float)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_used_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    agent: Mapped[str | None] = mapped_column(String(128), nullable=True)
    # Set for credentials of people signed in with an IdP: valid only while renewed with fresh sign-ins.
    lease_until: Mapped[float | None] = mapped_column(Float, nullable=True)

    __table_args__ = (Index("ix_credentials_user_connection", "user_id", "connection"),)


class Session(Base):
    __tablename__ = "sessions"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_name: Mapped[str] = mapped_column(String(128))  # the name it had then
    user_id: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)  # users.uid
    connection: Mapped[str] = mapped_column(String(63))
    credential_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    client_addr: Mapped[str] = mapped_column(String(64))
    started_at: Mapped[float] = mapped_column(Float)
    ended_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # active, closed, rejected (authentication or upstream failure before the session began)
    status: Mapped[str] = mapped_column(String(16))
    end_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    error_code: Mapped[str | None] = mapped_column(String(5), nullable=True)
    tls: Mapped[bool] = mapped_column(Boolean, default=False)
    application_name: Mapped[str | None] = mapped_column(String(128), nullable=True)
    gateway: Mapped[str | None] = mapped_column(String(32), nullable=True)
    agent: Mapped[str | None] = mapped_column(String(128), nullable=True)
    masked: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # column -> values masked
    purged_at: Mapped[float | None] = mapped_column(Float, nullable=True)  # content removed by retention

    __table_args__ = (Index("ix_sessions_started_at", "started_at"),)


class Statement(Base):
    __tablename__ = "statements"
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    text: Mapped[str] = mapped_column(Text)
    param_count: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[float] = mapped_column(Float)
    duration_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    # running, ok, error, skipped (voided by an earlier error in the same pipeline), aborted
    status: Mapped[str] = mapped_column(String(16))
    rows: Mapped[int | None] = mapped_column(Integer, nullable=True)
    command_tag: Mapped[str | None] = mapped_column(Text, nullable=True)
    error_code: Mapped[str | None] = mapped_column(String(5), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    # The gateway's decision (allow, deny, review, shadow) and the rules that matched, with their reasons.
    decision: Mapped[str | None] = mapped_column(String(16), nullable=True)
    rules: Mapped[list | None] = mapped_column(JSON, nullable=True)
    params: Mapped[list | None] = mapped_column(JSON, nullable=True)  # bound values, masked where a rule applies
    # Per [recording] results: {"columns": [...], "rows": n} (summary), plus "sample": first rows, masked.
    result: Mapped[dict | None] = mapped_column(JSON, nullable=True)


class ApiKey(Base):
    """A key for a machine (kind service: its own name and groups) or an agent acting for a user."""

    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(16))  # service or agent
    user_name: Mapped[str] = mapped_column(String(128))  # svc:<name>, or the person an agent acts for
    user_id: Mapped[str | None] = mapped_column(String(32), nullable=True)  # users.uid
    agent: Mapped[str | None] = mapped_column(String(128), nullable=True)
    groups: Mapped[list] = mapped_column(JSON, default=list)
    secret_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    created_by: Mapped[str | None] = mapped_column(String(128), nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_used_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Event(Base):
    """A security-relevant fact outside a native session (API authentication, refusals, issued credentials)."""

    __tablename__ = "events"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    at: Mapped[float] = mapped_column(Float, index=True)
    kind: Mapped[str] = mapped_column(String(64))
    outcome: Mapped[str] = mapped_column(String(16))  # ok, denied
    user_name: Mapped[str | None] = mapped_column(String(128), nullable=True)
    agent: Mapped[str | None] = mapped_column(String(128), nullable=True)
    source: Mapped[str | None] = mapped_column(String(128), nullable=True)
    client_addr: Mapped[str | None] = mapped_column(String(64), nullable=True)
    detail: Mapped[str | None] = mapped_column(Text, nullable=True)
    # The audit hash chain (recording/audit.py): position, and the hashes that link it to the one before.
    seq: Mapped[int | None] = mapped_column(Integer, nullable=True, unique=True)
    prev_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    hash: Mapped[str | None] = mapped_column(String(64), nullable=True)


class AuditHead(Base):
    """The chain's last link (one row): appending takes its lock, so the chain stays one line."""

    __tablename__ = "audit_head"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(Integer)
    hash: Mapped[str] = mapped_column(String(64))


class Seal(Base):
    """A recorded row's part as the recorder wrote it (recording/seals.py), committed to by the chain's
    `record.seal` event at `event_seq`."""

    __tablename__ = "seals"
    event_seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    n: Mapped[int] = mapped_column(Integer, primary_key=True)  # its place among the event's seals
    session_id: Mapped[str] = mapped_column(String(32))
    seq: Mapped[int] = mapped_column(Integer)  # the statement's number; 0 for the session's own row
    part: Mapped[str] = mapped_column(String(20))
    digest: Mapped[str] = mapped_column(String(32))
    tags: Mapped[str] = mapped_column(Text)
    __table_args__ = (Index("ix_seals_row", "session_id", "seq"),)


class AuditCheckpoint(Base):
    """The chain head at `seq`, signed with the gateway's Ed25519 key."""

    __tablename__ = "audit_checkpoints"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    hash: Mapped[str] = mapped_column(String(64))
    at: Mapped[float] = mapped_column(Float)
    signature: Mapped[str] = mapped_column(Text)
    key_id: Mapped[str] = mapped_column(String(16))


class Review(Base):
    """A statement held for approval. Binds the requester, the connection and the exact input (its SHA-256)."""

    __tablename__ = "reviews"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # statement, or access (a just-in-time grant)
    status: Mapped[str] = mapped_column(String(16), index=True)  # pending, approved, rejected, revoked, executed, expired
    requester: Mapped[str] = mapped_column(String(128), index=True)
    requester_id: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)  # users.uid
    agent: Mapped[str | None] = mapped_column(String(128), nullable=True)
    agent_id: Mapped[str | None] = mapped_column(String(255), nullable=True)  # Identity.agent_id of who asked
    connection: Mapped[str] = mapped_column(String(128))
    statement: Mapped[str] = mapped_column(Text)
    params: Mapped[list] = mapped_column(JSON, default=list)
    sha256: Mapped[str] = mapped_column(String(64))
    policy_version: Mapped[str] = mapped_column(String(64))
    rules: Mapped[list] = mapped_column(JSON, default=list)  # the rules that asked for review, with reasons
    approvers: Mapped[list] = mapped_column(JSON, default=list)  # groups
    min_approvals: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[float] = mapped_column(Float, index=True)
    expires_at: Mapped[float] = mapped_column(Float)
    decided_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    executed_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    session_id: Mapped[str | None] = mapped_column(String(32), nullable=True)  # the session that ran it
    duration: Mapped[float | None] = mapped_column(Float, nullable=True)  # access: the window asked for, seconds
    window_end: Mapped[float | None] = mapped_column(Float, nullable=True)  # access: set when approved
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)  # the requester's justification


class ReviewDecision(Base):
    """One step of a review by a person: approve, reject (with a reason) or revoke."""

    __tablename__ = "review_decisions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    review_id: Mapped[str] = mapped_column(String(32), ForeignKey("reviews.id"), index=True)
    by: Mapped[str] = mapped_column(String(128))
    by_id: Mapped[str | None] = mapped_column(String(32), nullable=True)  # uid of who decided; approvals count these
    decision: Mapped[str] = mapped_column(String(16))  # approve, reject, revoke
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    at: Mapped[float] = mapped_column(Float)


class AuditSinkCursor(Base):
    """How far a streaming sink has delivered the audit chain: every event up to `seq` was accepted."""

    __tablename__ = "audit_sink_cursors"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer)
    at: Mapped[float] = mapped_column(Float)


class Analysis(Base):
    """A session's (or exec's) risk analysis."""

    __tablename__ = "analyses"
    session_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    level: Mapped[str] = mapped_column(String(8))  # low, medium, high
    title: Mapped[str] = mapped_column(Text)
    explanation: Mapped[str] = mapped_column(Text)
    findings: Mapped[list] = mapped_column(JSON)
    source: Mapped[str] = mapped_column(String(16))  # rules, or llm (rules refined by a model)
    at: Mapped[float] = mapped_column(Float)


class Snapshot(Base):
    """The last seen form of something that changes outside the API (the policy in the config file)."""

    __tablename__ = "snapshots"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    digest: Mapped[str] = mapped_column(String(64))
    body: Mapped[dict] = mapped_column(JSON)
    at: Mapped[float] = mapped_column(Float)


class ConsoleState(Base):
    """The web console's state, shared by every gateway replica: signed-in sessions (by the SHA-256 of
    their cookie), sign-ins waiting for the identity provider, and one-time sign-in links already used."""

    __tablename__ = "console_state"
    key: Mapped[str] = mapped_column(String(96), primary_key=True)  # session:<sha256>, signin:<sha256>, link:<nonce>
    user_name: Mapped[str | None] = mapped_column(String(128), nullable=True, index=True)
    user_id: Mapped[str | None] = mapped_column(String(32), nullable=True)  # users.uid
    data: Mapped[dict] = mapped_column(JSON)
    expires_at: Mapped[float] = mapped_column(Float, index=True)


class Key(Base):
    """A key every gateway replica shares, encrypted with the secret key (the audit signing key)."""

    __tablename__ = "keys"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value_enc: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[float] = mapped_column(Float)


class ExecResult(Base):
    """An exec's final envelope (masked, capped), kept a while for long-polls on any replica."""

    __tablename__ = "exec_results"
    session_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_name: Mapped[str] = mapped_column(String(128))
    user_id: Mapped[str | None] = mapped_column(String(32), nullable=True)  # users.uid
    envelope: Mapped[dict] = mapped_column(JSON)
    expires_at: Mapped[float] = mapped_column(Float, index=True)
