"""Settings from `wardgate.toml` and `WARDGATE_*` environment variables (the environment wins).

Every key of a section can be set as `WARDGATE_<SECTION>_<KEY>`, e.g. `WARDGATE_GATEWAY_LISTEN`,
`WARDGATE_STORE_URL`. `WARDGATE_CONFIG` names the file; `WARDGATE_SECRET_KEY` holds the key that
encrypts secrets at rest.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .analysis import AnalysisSettings

DEFAULT_CONFIG = "wardgate.toml"


class ConfigError(Exception):
    """The configuration cannot be used; the message says which setting and why."""


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(value: str | int | float) -> float:
    """'15m' -> 900.0; '12h', '90d', '30s' and plain seconds are accepted."""
    if isinstance(value, (int, float)):
        return float(value)
    m = _DURATION.match(value)
    if not m:
        raise ConfigError(f"invalid duration {value!r}: use a number with s, m, h or d (e.g. 15m)")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_hostport(value: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = default_host, value
    host = host.strip("[]") or default_host
    try:
        return host, int(port)
    except ValueError as exc:
        raise ConfigError(f"invalid listen address {value!r}: use HOST:PORT") from exc


@dataclass
class GatewaySettings:
    listen: str = "127.0.0.1:6432"
    http_listen: str = "127.0.0.1:8080"
    tls_cert: str = ""
    tls_key: str = ""
    http_tls: bool = False
    # "scram-sha-256" (default) or "password" (cleartext; accepted only over TLS)
    client_auth: str = "scram-sha-256"
    require_tls: bool = False
    max_message_size: int = 128 * 1024 * 1024
    # Bytes held for inspection across all sessions (partial messages, rows being masked); past it, the
    # session holding the most is ended with 53200 and everyone else is served.
    inspect_budget: int = 512 * 1024 * 1024
    # Text values longer than this are masked whole ("[unscanned]") where content detectors apply, rather
    # than searched: detection is linear, yet one value must not hold the event loop for long.
    max_scanned_value: int = 1024 * 1024
    # Log each event-loop callback that runs longer than this many milliseconds (0: off; costs speed).
    slow_callback_ms: float = 0
    # Seconds a worker may spend classifying one long statement before it is refused as too costly.
    inspect_timeout: float = 10.0
    upstream_connect_timeout: float = 10.0
    auth_timeout: float = 30.0
    # /metrics (Prometheus): open on the HTTP listener, or, with this set, only to a bearer token
    # held in the named environment variable
    metrics_token_env: str = ""
    log_format: str = "text"  # or "json": one object a line, with session and request ids
    # Reverse proxies (IPs or CIDRs) whose X-Forwarded-For / X-Forwarded-Proto the HTTP listener believes;
    # from anyone else the headers are ignored (the sign-in throttle and the records key on the address).
    trusted_proxies: list[str] = field(default_factory=list)


@dataclass
class StoreSettings:
    url: str = ""


@dataclass
class CredentialSettings:
    default_ttl: str = "15m"
    max_ttl: str = "12h"
    # Credentials of people signed in with an IdP stay valid only while `wardgate connect` renews them
    # with a fresh sign-in this often; a disabled user or a revoked IdP session ends their sessions.
    idp_recheck: str = "60s"
    # An agent key acting for a person of an IdP works only while a token of that person was seen this
    # recently (API, CLI, console): its groups are the ones the IdP last confirmed, never older.
    agent_recheck: str = "12h"


@dataclass
class ExecSettings:
    """One-shot exec (HTTP API, CLI, MCP, web console)."""

    wait: str = "50s"  # how long a caller waits before the answer is `running`
    max_rows: int = 1000  # rows returned per exec; more are counted and flagged as truncated
    max_bytes: int = 4 * 1024 * 1024
    keep: str = "15m"  # how long a finished exec's result stays for long-polls

    @property
    def wait_seconds(self) -> float:
        return parse_duration(self.wait)

    @property
    def keep_seconds(self) -> float:
        return parse_duration(self.keep)


@dataclass
class ReviewSettings:
    """Reviews of statements that a guardrail with `action = "review"` holds for a person's approval."""

    ttl: str = "24h"  # a pending review expires after this; an approved one must run before it too
    url: str = ""  # base URL of the web console, for links in answers and notifications
    webhook_url: str = ""  # JSON of every review step, POSTed here (signed when webhook_secret_env is set)
    webhook_secret_env: str = ""  # environment variable holding the HMAC secret for the webhook
    slack_webhook_url: str = ""  # a Slack incoming webhook: a message with a link to each review step

    @property
    def ttl_seconds(self) -> float:
        return parse_duration(self.ttl)


@dataclass
class RecordingSettings:
    """What a session's record keeps of results, and for how long session content is kept."""

    results: str = "summary"  # off, summary (columns and row count) or sample (also the first rows, masked)
    sample_rows: int = 5  # rows kept of each result, with results = "sample"
    sample_bytes: int = 64 * 1024  # sampled data kept per session at most
    retention: str = ""  # e.g. 90d: older session content is purged (the audit log keeps that it was); "" keeps all
    # os: a record is in the operating system's cache before the statement is forwarded (survives a
    # crash of the gateway); fsync: on disk (survives an OS crash and power loss), at the cost of a
    # disk flush per statement, shared by the statements of all sessions that wait at once.
    durability: str = "os"

    @property
    def retention_seconds(self) -> float | None:
        return parse_duration(self.retention) if self.retention else None


@dataclass
class McpSettings:
    """The MCP server for AI agents, at /mcp on the HTTP listener."""

    enabled: bool = True
    resource_url: str = ""  # the URL agents reach it at (tokens' audience); default http(s)://<http_listen>/mcp


@dataclass
class RoleSettings:
    """Groups whose members hold a management role on the HTTP API."""

    admins: list[str] = field(default_factory=list)
    auditors: list[str] = field(default_factory=list)


DEFAULT_PASSWORD_ENV_PREFIX = "WARDGATE_CONN_"


@dataclass
class UpstreamSettings:
    """How the gateway holds the secrets of its upstream connections."""

    # A connection's password_env may name only variables starting with this: the gateway's environment
    # holds its own secrets too (WARDGATE_SECRET_KEY, the store's URL), which no connection may send.
    password_env_prefix: str = DEFAULT_PASSWORD_ENV_PREFIX


# password_auth: "scram-sha-256" sends the password only through SCRAM (the server learns nothing it
# could replay); "any" also answers md5 and cleartext requests, never over unverified verify-* TLS.
PASSWORD_AUTH = ("scram-sha-256", "any")


@dataclass
class ConnectionSpec:
    name: str
    host: str = "127.0.0.1"
    port: int = 5432
    database: str = "postgres"
    user: str = "postgres"
    password: str | None = None
    password_env: str | None = None
    sslmode: str = "prefer"
    sslrootcert: str | None = None
    password_auth: str = "scram-sha-256"


ALLOWED_ALGORITHMS = ("RS256", "ES256", "EdDSA")


@dataclass
class IdentityProviderSpec:
    """An OpenID provider whose access tokens the gateway accepts."""

    name: str
    issuer: str
    audience: str
    client_id: str = ""
    groups_claim: str = "groups"
    # The claim that keys a person (with the issuer): stable at the provider, never reassigned. `sub` is.
    subject_claim: str = "sub"
    # The claim a person is named by here (shown, and their user name for native sign-in). Only a label:
    # it is unique among users, and a token whose name is another identity's is refused.
    user_claim: str = "preferred_username"
    group_map: dict[str, str] = field(default_factory=dict)
    algorithms: list[str] = field(default_factory=lambda: list(ALLOWED_ALGORITHMS))
    leeway: int = 30


SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


@dataclass
class Settings:
    path: Path | None = None
    data_dir: Path = Path(".wardgate")
    secret_key: str | None = None
    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    credentials: CredentialSettings = field(default_factory=CredentialSettings)
    roles: RoleSettings = field(default_factory=RoleSettings)
    exec: ExecSettings = field(default_factory=ExecSettings)
    reviews: ReviewSettings = field(default_factory=ReviewSettings)
    mcp: McpSettings = field(default_factory=McpSettings)
    recording: RecordingSettings = field(default_factory=RecordingSettings)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    connections: list[ConnectionSpec] = field(default_factory=list)
    identity_providers: list[IdentityProviderSpec] = field(default_factory=list)
    access: list[Any] = field(default_factory=list)  # policy.access.AccessRule
    guardrails: list[Any] = field(default_factory=list)  # policy.guardrails.Rule
    masking: list[Any] = field(default_factory=list)  # masking.plan.MaskRule
    audit_sinks: list[Any] = field(default_factory=list)  # recording.sinks.SinkSpec
    analysis: AnalysisSettings = field(default_factory=AnalysisSettings)

    @property
    def store_url(self) -> str:
        return self.store.url or f"sqlite:///{(self.data_dir / 'wardgate.db').resolve()}"

    @property
    def mcp_resource_url(self) -> str:
        if self.mcp.resource_url:
            return self.mcp.resource_url.rstrip("/")
        return f"{'https' if self.gateway.http_tls else 'http'}://{self.gateway.http_listen}/mcp"

    @property
    def journal_dir(self) -> Path:
        return self.data_dir / "journal"

    @property
    def default_ttl(self) -> float:
        return parse_duration(self.credentials.default_ttl)

    @property
    def max_ttl(self) -> float:
        return parse_duration(self.credentials.max_ttl)

    @property
    def idp_recheck(self) -> float:
        return parse_duration(self.credentials.idp_recheck)


def _apply(obj: Any, values: dict[str, Any], section: str) -> None:
    known = {f.name: f for f in fields(obj)}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"unknown setting [{section}] {key}; known: {', '.join(sorted(known))}")
        current = getattr(obj, key)
        if isinstance(current, bool) and isinstance(value, str):
            value = value.strip().lower() in ("1", "true", "yes", "on")
        elif isinstance(current, (int, float)) and not isinstance(current, bool) and isinstance(value, str):
            try:
                value = type(current)(value)
            except ValueError as exc:
                raise ConfigError(f"[{section}] {key} must be a number, got {value!r}") from exc
        elif isinstance(current, list):
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            elif not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"[{section}] {key} must be a list of strings, got {value!r}")
        elif isinstance(current, str) and not isinstance(value, str):
            raise ConfigError(f"[{section}] {key} must be a string, got {value!r}")
        elif isinstance(current, bool) and not isinstance(value, bool):
            raise ConfigError(f"[{section}] {key} must be true or false, got {value!r}")
        elif isinstance(current, (int, float)) and not isinstance(value, (int, float)):
            raise ConfigError(f"[{section}] {key} must be a number, got {value!r}")
        setattr(obj, key, value)


_LISTS = ("access", "guardrails", "masking", "connections", "identity_providers")


def load(path: str | os.PathLike[str] | None = None, env: dict[str, str] | None = None) -> Settings:
    """Read settings from `path` (or $WARDGATE_CONFIG, or ./wardgate.toml if present) and the environment."""
    env = dict(os.environ if env is None else env)
    explicit = path or env.get("WARDGATE_CONFIG")
    cfg_path = Path(explicit) if explicit else Path(DEFAULT_CONFIG)
    raw: dict[str, Any] = {}
    if cfg_path.exists():
        try:
            raw = tomllib.loads(cfg_path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{cfg_path}: {exc}") from exc
    elif explicit:
        raise ConfigError(f"config file {cfg_path} does not exist; create it or drop --config")

    settings = Settings(path=cfg_path.resolve() if cfg_path.exists() else None)
    base = cfg_path.resolve().parent if cfg_path.exists() else Path.cwd()
    for extra in raw.pop("include", []):
        # Policy files kept apart from the gateway's settings: their rule lists join the main file's.
        extra_path = base / extra
        try:
            included = tomllib.loads(extra_path.read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"{cfg_path}: included file {extra_path} does not exist") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{extra_path}: {exc}") from exc
        for key, value in included.items():
            if key not in _LISTS:
                raise ConfigError(f"{extra_path}: only {', '.join(_LISTS)} may be included, not {key!r}")
            raw.setdefault(key, []).extend(value)
    sections = {"gateway": settings.gateway, "store": settings.store, "credentials": settings.credentials,
                "roles": settings.roles, "exec": settings.exec, "reviews": settings.reviews,
                "mcp": settings.mcp, "analysis": settings.analysis,
                "recording": settings.recording, "upstream": settings.upstream}
    for key, value in raw.items():
        if key in sections:
            _apply(sections[key], value, key)
        elif key == "connections":
            settings.connections = [_connection(c) for c in value]
        elif key == "identity_providers":
            settings.identity_providers = [_identity_provider(p) for p in value]
        elif key == "access":
            settings.access = [_access_rule(i, r) for i, r in enumerate(value, 1)]
        elif key == "masking":
            from .masking.plan import parse_rules as parse_masking

            try:
                settings.masking = parse_masking(value)
            except (ValueError, TypeError) as exc:
                raise ConfigError(str(exc)) from exc
        elif key == "guardrails":
            from .policy.guardrails import parse_rules

            try:
                settings.guardrails = parse_rules(value)
            except (ValueError, TypeError) as exc:
                raise ConfigError(str(exc)) from exc
        elif key == "audit_sinks":
            from .recording.sinks import parse_sinks

            settings.audit_sinks = parse_sinks(value)
        elif key == "data_dir":
            settings.data_dir = Path(value)
        elif key == "secret_key":
            settings.secret_key = value
        else:
            raise ConfigError(f"unknown section or setting {key!r} in {cfg_path}")

    for name, obj in sections.items():
        prefix = f"WARDGATE_{name.upper()}_"
        _apply(obj, {k[len(prefix) :].lower(): v for k, v in env.items() if k.startswith(prefix)}, name)
    if env.get("WARDGATE_DATA_DIR"):
        settings.data_dir = Path(env["WARDGATE_DATA_DIR"])
    if env.get("WARDGATE_SECRET_KEY"):
        settings.secret_key = env["WARDGATE_SECRET_KEY"]
    if not settings.data_dir.is_absolute():
        settings.data_dir = base / settings.data_dir
    for attr in ("tls_cert", "tls_key"):
        value = getattr(settings.gateway, attr)
        if value and not Path(value).is_absolute():
            setattr(settings.gateway, attr, str(base / value))
    validate(settings)
    return settings


def _connection(raw: dict[str, Any]) -> ConnectionSpec:
    if "name" not in raw:
        raise ConfigError("every [[connections]] entry needs a name")
    try:
        spec = ConnectionSpec(**raw)
    except TypeError as exc:
        raise ConfigError(f"connection {raw['name']!r}: {exc}") from exc
    return spec  # validated in validate(), once [upstream] password_env_prefix is known


def _identity_provider(raw: dict[str, Any]) -> IdentityProviderSpec:
    for required in ("name", "issuer", "audience"):
        if required not in raw:
            raise ConfigError(f"every [[identity_providers]] entry needs {required}")
    try:
        spec = IdentityProviderSpec(**raw)
    except TypeError as exc:
        raise ConfigError(f"identity provider {raw['name']!r}: {exc}") from exc
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,48}", spec.name) or spec.name == "svc":
        raise ConfigError(f"identity provider {spec.name!r}: name it with letters, digits, '.', '_', '-' ('svc' is "
                          "the service accounts' namespace)")
    bad = set(spec.algorithms) - set(ALLOWED_ALGORITHMS)
    if bad or not spec.algorithms:
        raise ConfigError(
            f"identity provider {spec.name!r}: algorithms must be among {', '.join(ALLOWED_ALGORITHMS)} (got {sorted(bad)})"
        )
    return spec


def _access_rule(index: int, raw: dict[str, Any]) -> Any:
    from .policy.access import DAYS, VERBS, AccessRule, parse_hours

    name = raw.get("name", f"access-{index}")
    unknown = set(raw) - {"name", "groups", "connections", "verbs", "hours", "days", "approvers", "max_duration",
                          "min_approvals"}
    if unknown:
        raise ConfigError(f"access rule {name!r}: unknown keys {sorted(unknown)}")
    groups, connections = raw.get("groups"), raw.get("connections")
    if not groups or not connections:
        raise ConfigError(f"access rule {name!r} needs groups and connections")
    verbs = tuple(raw.get("verbs", VERBS))
    days = tuple(d.lower()[:3] for d in raw.get("days", DAYS))
    if set(verbs) - set(VERBS) or set(days) - set(DAYS):
        raise ConfigError(f"access rule {name!r}: verbs are {', '.join(VERBS)}; days are {', '.join(DAYS)}")
    try:
        hours = parse_hours(raw["hours"]) if raw.get("hours") else None
    except ValueError as exc:
        raise ConfigError(f"access rule {name!r}: {exc}") from exc
    approvers = tuple(raw.get("approvers", ()))
    if ("max_duration" in raw or "min_approvals" in raw) and not approvers:
        raise ConfigError(f"access rule {name!r}: max_duration and min_approvals go with approvers (a grant rule)")
    max_duration = parse_duration(raw.get("max_duration", "1h"))
    min_approvals = int(raw.get("min_approvals", 1))
    if max_duration <= 0 or min_approvals < 1:
        raise ConfigError(f"access rule {name!r}: max_duration must be positive and min_approvals at least 1")
    return AccessRule(name, tuple(groups), tuple(connections), verbs, hours, days, approvers, max_duration, min_approvals)


# The variables the gateway reads as its own settings (WARDGATE_<SECTION>_<KEY>) and secrets.
_OWN_VARIABLES = ("WARDGATE_CONFIG", "WARDGATE_SECRET_KEY", "WARDGATE_DATA_DIR", *(
    f"WARDGATE_{s.upper()}_" for s in ("gateway", "store", "credentials", "roles", "exec", "reviews", "mcp",
                                       "analysis", "recording", "upstream")))


def _gateway_variable(name: str) -> bool:
    """A variable the gateway reads as its own settings (or secrets), never a connection's password."""
    return any(name == v or (v.endswith("_") and name.startswith(v)) for v in _OWN_VARIABLES)


def password_env_refusal(name: str, prefix: str) -> str | None:
    """Why `name` may not be a connection's password_env under `prefix`, or None."""
    if not prefix or not name.startswith(prefix) or name == prefix:
        example = re.sub(r"[^A-Z0-9_]", "_", name.upper())
        example = prefix + (example if example and not example.startswith(("WARDGATE_", prefix)) else "PROD_PASSWORD")
        return (f"password_env {name!r} is refused: it must name an environment variable starting with "
                f"{prefix!r} ([upstream] password_env_prefix), e.g. {example}")
    if _gateway_variable(name):
        return f"password_env {name!r} is one of the gateway's own settings, never a connection's password"
    return None


def validate_connection(spec: ConnectionSpec, password_env_prefix: str = DEFAULT_PASSWORD_ENV_PREFIX) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,62}", spec.name):
        raise ConfigError(f"connection name {spec.name!r}: use letters, digits, '_', '.', '-' (max 63)")
    if spec.sslmode not in SSLMODES:
        raise ConfigError(f"connection {spec.name!r}: sslmode must be one of {', '.join(SSLMODES)}")
    if spec.password_auth not in PASSWORD_AUTH:
        raise ConfigError(f"connection {spec.name!r}: password_auth must be one of {', '.join(PASSWORD_AUTH)}")
    if spec.password and spec.password_env:
        raise ConfigError(f"connection {spec.name!r}: give password or password_env, not both")
    if spec.password_env and (why := password_env_refusal(spec.password_env, password_env_prefix)):
        raise ConfigError(f"connection {spec.name!r}: {why}")


def validate(settings: Settings) -> None:
    parse_hostport(settings.gateway.listen)
    parse_hostport(settings.gateway.http_listen)
    if settings.gateway.client_auth not in ("scram-sha-256", "password"):
        raise ConfigError("[gateway] client_auth must be 'scram-sha-256' or 'password'")
    if settings.gateway.log_format not in ("text", "json"):
        raise ConfigError("[gateway] log_format must be 'text' or 'json'")
    for proxy in settings.gateway.trusted_proxies:
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            raise ConfigError(f"[gateway] trusted_proxies: {proxy!r} is not an IP address or CIDR "
                              "(e.g. 10.0.0.5 or 10.0.0.0/24)") from None
    if bool(settings.gateway.tls_cert) != bool(settings.gateway.tls_key):
        raise ConfigError("[gateway] tls_cert and tls_key go together: set both or neither")
    if settings.default_ttl > settings.max_ttl:
        raise ConfigError("[credentials] default_ttl is longer than max_ttl")
    for section, name in (("exec", "wait"), ("exec", "keep"), ("reviews", "ttl")):
        value = getattr(getattr(settings, section), name)
        try:
            parse_duration(value)
        except ConfigError as exc:
            raise ConfigError(f"[{section}] {name}: {exc}") from None
    rec = settings.recording
    if rec.results not in ("off", "summary", "sample"):
        raise ConfigError("[recording] results must be off, summary or sample")
    if rec.durability not in ("os", "fsync"):
        raise ConfigError("[recording] durability must be os or fsync")
    if rec.sample_rows < 1 or rec.sample_bytes < 1:
        raise ConfigError("[recording] sample_rows and sample_bytes must be positive")
    try:
        rec.retention_seconds  # noqa: B018 - parsed here to report a bad value at start
    except ConfigError as exc:
        raise ConfigError(f"[recording] retention: {exc}") from None
    try:
        settings.analysis.validate()
    except ValueError as exc:
        raise ConfigError(f"[analysis] {exc}") from None
    if settings.exec.max_rows < 1 or settings.exec.max_bytes < 1:
        raise ConfigError("[exec] max_rows and max_bytes must be positive")
    prefix = settings.upstream.password_env_prefix
    if (not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", prefix) or _gateway_variable(prefix)
            or any(v.startswith(prefix) for v in _OWN_VARIABLES)):
        raise ConfigError(f"[upstream] password_env_prefix {prefix!r}: use letters, digits and '_', and a prefix "
                          f"that none of the gateway's own variables starts with (e.g. {DEFAULT_PASSWORD_ENV_PREFIX!r})")
    for spec in settings.connections:
        validate_connection(spec, prefix)
    names = [c.name for c in settings.connections]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ConfigError(f"connections declared twice in the config: {', '.join(sorted(dupes))}")
