"""Access rules: groups to connections and verbs, with optional time windows. No rule, no access."""

from __future__ import annotations

import datetime as dt
import fnmatch
from dataclasses import dataclass, field

from ..domain import Identity

VERBS = ("connect", "exec")
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


@dataclass(frozen=True)
class AccessRule:
    name: str
    groups: tuple[str, ...]
    connections: tuple[str, ...]  # names or shell-style patterns (shop, analytics_*, *)
    verbs: tuple[str, ...] = VERBS
    hours: tuple[int, int] | None = None  # [start, end) in minutes after midnight, UTC
    days: tuple[str, ...] = field(default=DAYS)
    # Just-in-time: with approvers, the rule allows only within an approved grant's window.
    approvers: tuple[str, ...] = ()
    max_duration: float = 3600.0  # the longest window a grant may ask for, in seconds
    min_approvals: int = 1

    @property
    def just_in_time(self) -> bool:
        return bool(self.approvers)

    def matches(self, identity: Identity, connection: str, verb: str, now: dt.datetime) -> bool:
        if verb not in self.verbs or not set(self.groups) & set(identity.groups):
            return False
        if not any(fnmatch.fnmatchcase(connection, pattern) for pattern in self.connections):
            return False
        return in_window(now, self.hours, self.days)


def in_window(now: dt.datetime, hours: tuple[int, int] | None, days: tuple[str, ...]) -> bool:
    """Whether `now` (UTC) falls on one of `days` and within `hours` ([start, end) minutes; may wrap midnight)."""
    if DAYS[now.weekday()] not in days:
        return False
    if hours is None:
        return True
    minute = now.hour * 60 + now.minute
    start, end = hours
    return start <= minute < end if start <= end else (minute >= start or minute < end)


@dataclass(frozen=True)
class AccessDecision:
    allowed: bool
    rule: str | None
    reason: str
    until: float | None = None  # allowed by a grant: its window ends then (epoch seconds)


def parse_hours(value: str) -> tuple[int, int]:
    """'08:00-18:30' -> (480, 1110). A window may wrap midnight ('22:00-06:00')."""
    try:
        start, end = value.split("-")
        sh, sm = (int(x) for x in start.strip().split(":"))
        eh, em = (int(x) for x in end.strip().split(":"))
    except ValueError as exc:
        raise ValueError(f"hours {value!r}: use HH:MM-HH:MM (UTC)") from exc
    if not (0 <= sh < 24 and 0 <= eh <= 24 and 0 <= sm < 60 and 0 <= em < 60):
        raise ValueError(f"hours {value!r}: out of range")
    return sh * 60 + sm, eh * 60 + em


class AccessPolicy:
    def __init__(self, rules: list[AccessRule]) -> None:
        self.rules = rules
        self.has_grant_rules = any(r.just_in_time for r in rules)

    def check(self, identity: Identity, connection: str, verb: str, now: dt.datetime | None = None,
              grants: dict[str, float] | None = None) -> AccessDecision:
        """`grants`: the identity's approved grant windows, connection -> end (epoch seconds)."""
        now = now or dt.datetime.now(dt.UTC)
        waiting: AccessRule | None = None
        for rule in self.rules:
            if rule.matches(identity, connection, verb, now):
                if not rule.just_in_time:
                    return AccessDecision(True, rule.name, f"allowed by access rule {rule.name!r}")
                end = (grants or {}).get(connection)
                if end is not None and end > now.timestamp():
                    until = dt.datetime.fromtimestamp(end, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
                    return AccessDecision(True, rule.name, f"allowed by a grant under access rule {rule.name!r} until {until}",
                                          until=end)
                waiting = waiting or rule
        if waiting is not None:
            return AccessDecision(
                False, waiting.name,
                f"{identity.display} may {verb} to connection {connection!r} only with an approved grant (access rule "
                f"{waiting.name!r}, approvers: {', '.join(waiting.approvers)}); ask with "
                f"`wardgate grants request {connection} --duration 1h --reason ...`",
            )
        groups = ", ".join(identity.groups) or "no groups"
        return AccessDecision(
            False, None,
            f"{identity.display} ({groups}) may not {verb} to connection {connection!r}: no access rule allows it",
        )

    def grant_rule(self, identity: Identity, connection: str, now: dt.datetime | None = None) -> AccessRule | None:
        """The just-in-time rule under which `identity` may ask for a grant on `connection`."""
        now = now or dt.datetime.now(dt.UTC)
        return next((r for r in self.rules if r.just_in_time and any(r.matches(identity, connection, v, now) for v in r.verbs)),
                    None)
