"""What an identity may be called, and when two names are the same name.

Every door checks names with these, so no stored name can break a listing, a URL, the removal of its
identity or the column that holds it: '#' is kept for removed identities (`#removed-<uid>`), ':' for
namespaces (`svc:`), and a name fits its column. Two names that read alike (case, width, compatibility
forms: "Alice", "ａｌｉｃｅ" and "alice") are one name: `name_key` is unique among live identities."""

from __future__ import annotations

import hashlib
import re
import unicodedata

MAX_NAME = 120
REMOVED_PREFIX = "#removed-"
_SERVICE = re.compile(r"svc:[A-Za-z0-9_][A-Za-z0-9_.-]{0,115}")


def valid_person_name(name: str, *, local: bool = False) -> bool:
    """A person's name. ':' separates namespaces, '#' marks removed identities, '/' and spaces break URLs
    and lists; a local name (one native clients type as their user) has no '@' either."""
    forbidden = ":/# @" if local else ":/# "
    return 0 < len(name) <= MAX_NAME and not any(c in name for c in forbidden) and name.isprintable()


def valid_service_name(principal: str) -> bool:
    """A service account's name, `svc:` and ASCII letters, digits, '.', '_', '-'."""
    return _SERVICE.fullmatch(principal) is not None


def valid_agent_name(name: str) -> bool:
    """An agent's name as a key or token gives it: shown in every record, so printable and short."""
    return 0 < len(name) <= MAX_NAME and name.isprintable() and name.strip() == name


def name_key(name: str) -> str:
    """What makes two names one: NFKC, then case folded; hashed, so any name fits the column."""
    return hashlib.sha256(unicodedata.normalize("NFKC", name).casefold().encode("utf-8", "surrogatepass")).hexdigest()[:40]
