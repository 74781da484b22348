"""Session risk analysis: a rule engine that gives a session (or an exec before it runs) a level
(low, medium, high), a short title and an explanation. Sans-IO: the caller brings the facts.

Rules (thresholds from [analysis] in wardgate.toml):
- privilege commands (GRANT, REVOKE, roles, ALTER SYSTEM, SET ROLE / SESSION AUTHORIZATION): high
- schema changes: DROP, TRUNCATE and database-level changes high, other DDL medium
- many refused attempts in one session: medium, three times as many high
- writes outside business hours: medium
- bulk reads of masked data (values masked in the session): medium, ten times as many high
- unusual volume: far more rows than this user's recent sessions: medium
"""

from __future__ import annotations

import datetime as dt
import re
import statistics
from dataclasses import dataclass, field
from typing import Any

from ..policy.access import DAYS, in_window, parse_hours
from ..policy.guardrails import StatementPolicy
from ..sql.classify import READ_KINDS, Classification

LEVELS = ("low", "medium", "high")
PRIVILEGE_KINDS = frozenset({
    "grant", "grant_role", "create_role", "alter_role", "alter_role_set", "drop_role", "alter_system",
    "alter_default_privileges", "reassign_owned", "drop_owned", "alter_owner", "create_user_mapping",
    "alter_user_mapping", "security_label",
})
DML_KINDS = frozenset({"insert", "update", "delete", "merge", "copy_from"})
DESTRUCTIVE_KINDS = frozenset({"drop", "truncate", "drop_database", "create_database", "alter_database",
                               "alter_database_set", "drop_tablespace"})
_SET_ROLE = re.compile(r"^\s*set\s+(?:session\s+|local\s+)?(?:role|session\s+authorization)\b", re.I)


@dataclass
class AnalysisSettings:
    """[analysis] in wardgate.toml."""

    enabled: bool = True
    business_hours: str = "07:00-19:00"  # UTC; writes outside it are noted
    business_days: list[str] = field(default_factory=lambda: ["mon", "tue", "wed", "thu", "fri"])
    denied_attempts: int = 3  # refusals in one session that make it medium (three times as many: high)
    bulk_values: int = 1000  # masked values in one session that make it medium (ten times as many: high)
    volume_factor: float = 10.0  # rows beyond this many times the user's median session are unusual
    on_exec_medium: str = "allow"  # what an exec at this level gets: allow, review or block
    on_exec_high: str = "review"
    llm_url: str = ""  # an OpenAI-compatible API (https://host/v1); nothing calls out unless set
    llm_model: str = ""
    llm_key_env: str = ""  # the environment variable holding its API key
    llm_timeout: float = 30.0

    def validate(self) -> None:
        parse_hours(self.business_hours)
        if set(self.business_days) - set(DAYS):
            raise ValueError(f"business_days are {', '.join(DAYS)}")
        for name in ("on_exec_medium", "on_exec_high"):
            if getattr(self, name) not in ("allow", "review", "block"):
                raise ValueError(f"{name} must be allow, review or block")
        if self.denied_attempts < 1 or self.bulk_values < 1 or self.volume_factor <= 1:
            raise ValueError("denied_attempts and bulk_values must be positive, volume_factor above 1")
        if self.llm_url and not (self.llm_model and self.llm_url.startswith(("http://", "https://"))):
            raise ValueError("llm_url must be http(s):// and goes with llm_model")


@dataclass
class StatementFacts:
    text: str
    started_at: float
    status: str  # ok, error, denied, skipped, aborted, running, or pending (an exec not yet run)
    decision: str = "allow"
    rows: int | None = None
    classification: Classification | None = None  # when made already (a long exec's, in a worker)


@dataclass
class Finding:
    rule: str
    level: str
    title: str
    explanation: str

    def public(self) -> dict[str, str]:
        return {"rule": self.rule, "level": self.level, "title": self.title, "explanation": self.explanation}


@dataclass
class Analysis:
    level: str
    title: str
    explanation: str
    findings: list[Finding]
    source: str = "rules"

    def public(self) -> dict[str, Any]:
        return {"level": self.level, "title": self.title, "explanation": self.explanation, "source": self.source,
                "findings": [f.public() for f in self.findings]}


def _rank(level: str) -> int:
    return LEVELS.index(level)


def _refused(st: StatementFacts) -> bool:
    return st.status == "denied" or st.decision in ("deny", "review")


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%a %H:%M UTC")


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= 80 else text[:77] + "..."


def analyze(statements: list[StatementFacts], settings: AnalysisSettings, *, masked: dict[str, int] | None = None,
            history: list[int] | None = None, earlier_refusals: int = 0) -> Analysis:
    """`history`: rows returned in this user's recent sessions; `earlier_refusals`: refusals of this
    user just before (for an exec, whose own session has none yet)."""
    findings: list[Finding] = []
    hours = parse_hours(settings.business_hours)
    days = tuple(settings.business_days)
    privileged, destructive, ddl, off_hours = [], [], [], []
    classified = StatementPolicy([])  # no rules: its cache of classifications, as a session repeats a few statements
    for st in statements:
        c = st.classification or classified.decide(st.text).classification
        kinds = set(c.kinds)
        ran = not _refused(st)
        if kinds & PRIVILEGE_KINDS or ("variable_set" in kinds and _SET_ROLE.search(st.text)):
            privileged.append((st, ran))
        changes = kinds - READ_KINDS - DML_KINDS - PRIVILEGE_KINDS - {"variable_set"}
        if changes & DESTRUCTIVE_KINDS:
            destructive.append((st, ran))
        elif changes:
            ddl.append((st, ran))
        if ran and st.status in ("ok", "pending", "running") and c.is_write and not in_window(
                dt.datetime.fromtimestamp(st.started_at, dt.UTC), hours, days):
            off_hours.append(st)
    if privileged:
        st, ran = privileged[0]
        findings.append(Finding("privilege", "high" if any(r for _, r in privileged) else "medium",
                                "Privilege command" + ("" if any(r for _, r in privileged) else " attempted"),
                                f"{len(privileged)} statement(s) change roles, grants or server settings, "
                                f"e.g. {_short(st.text)!r}"))
    if destructive or ddl:
        worst = destructive or ddl
        st, _ = worst[0]
        findings.append(Finding("schema-change", "high" if destructive else "medium",
                                "Destructive schema change" if destructive else "Schema change",
                                f"{len(destructive) + len(ddl)} statement(s) change the schema, e.g. {_short(st.text)!r}"))
    refusals = sum(1 for st in statements if _refused(st)) + earlier_refusals
    if refusals >= settings.denied_attempts:
        findings.append(Finding("denied-attempts", "high" if refusals >= 3 * settings.denied_attempts else "medium",
                                "Many refused attempts",
                                f"{refusals} statement(s) were refused by the gateway's rules"
                                + (f" ({earlier_refusals} just before this one)" if earlier_refusals else "")))
    if off_hours:
        findings.append(Finding("off-hours-write", "medium", "Writes outside business hours",
                                f"{len(off_hours)} write(s) outside {settings.business_hours} UTC "
                                f"({', '.join(days)}), first at {_when(off_hours[0].started_at)}"))
    total_masked = sum((masked or {}).values())
    if total_masked >= settings.bulk_values:
        top = ", ".join(f"{k} ({v})" for k, v in sorted((masked or {}).items(), key=lambda kv: -kv[1])[:3])
        findings.append(Finding("bulk-masked-read", "high" if total_masked >= 10 * settings.bulk_values else "medium",
                                "Bulk read of masked data", f"{total_masked} values were masked: {top}"))
    rows = sum(st.rows or 0 for st in statements if not _refused(st))
    if history and len(history) >= 3:
        usual = statistics.median(history)
        if rows > max(settings.volume_factor * usual, settings.bulk_values):
            findings.append(Finding("unusual-volume", "medium", "Unusual volume for this user",
                                    f"{rows} rows, against a median of {usual:g} in the user's last {len(history)} sessions"))
    if not findings:
        what = f"{len(statements)} statement(s), {rows} row(s)"
        return Analysis("low", "Routine activity", f"Nothing of note: {what}.", [])
    findings.sort(key=lambda f: -_rank(f.level))
    top = findings[0]
    return Analysis(top.level, top.title, " ".join(f.explanation.rstrip(".") + "." for f in findings), findings)


def exec_action(level: str, settings: AnalysisSettings) -> str:
    """What policy says an exec at this risk level gets: allow, review or block."""
    if level == "high":
        return settings.on_exec_high
    if level == "medium":
        return settings.on_exec_medium
    return "allow"


def refine(rules: Analysis, answer: dict[str, Any]) -> Analysis:
    """A model's view merged in: it may raise the level and explain, never lower what the rules found
    (a statement's text could be written to talk a model down)."""
    level = answer.get("level")
    if level not in LEVELS:
        raise ValueError("the model's answer has no valid level")
    title = str(answer.get("title") or rules.title)[:120]
    explanation = str(answer.get("explanation") or "")[:2000]
    if _rank(level) < _rank(rules.level):
        return Analysis(rules.level, rules.title, f"{rules.explanation} Model's view ({level}): {explanation}".strip(),
                        rules.findings, "llm")
    return Analysis(level, title, explanation or rules.explanation, rules.findings, "llm")
