"""PII detectors over text, each with a C-speed pre-filter before any regular expression runs,
and checksums where the kind has one (Luhn for cards, mod-97 for IBANs)."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache


def luhn_ok(digits: str) -> bool:
    total, parity = 0, len(digits) % 2
    for i, ch in enumerate(digits):
        d = ord(ch) - 48
        if i % 2 == parity:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def iban_ok(candidate: str) -> bool:
    s = candidate[4:] + candidate[:4]
    try:
        return int("".join(str(int(c, 36)) for c in s)) % 97 == 1
    except ValueError:
        return False


def _ip_ok(candidate: str) -> bool:
    try:
        ipaddress.ip_address(candidate)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Detector:
    kind: str
    prefilter: Callable[[bytes], bool]
    pattern: re.Pattern[str]
    check: Callable[[str], bool] | None = None

    def spans(self, text: str) -> list[tuple[int, int]]:
        out = []
        for m in self.pattern.finditer(text):
            value = m.group(0)
            if self.check is None or self.check(value):
                out.append(m.span())
        return out


def _count_digits(raw: bytes) -> int:
    return len(raw) - len(raw.translate(None, b"0123456789"))


DETECTORS: dict[str, Detector] = {
    "email": Detector("email", lambda raw: b"@" in raw,
                      re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+")),
    "card": Detector("card", lambda raw: _count_digits(raw) >= 13,
                     re.compile(r"(?<!\d)(?:\d[ -]?){12,18}\d(?!\d)"),
                     lambda v: luhn_ok(re.sub(r"[ -]", "", v))),
    "ssn": Detector("ssn", lambda raw: b"-" in raw and _count_digits(raw) >= 9,
                    re.compile(r"(?<!\d)\d{3}-\d{2}-\d{4}(?!\d)")),
    "phone": Detector("phone", lambda raw: _count_digits(raw) >= 7,
                      # international (+…), an area code in parentheses, or North American 555-123-4567
                      re.compile(r"(?<![\w.+])(?:\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]\d{2,4}){1,3}"
                                 r"|\(\d{2,4}\)[ .-]?\d{3,4}[ .-]?\d{3,4}|\d{3}[.-]\d{3}[.-]\d{4})(?![\w.])")),
    "iban": Detector("iban", lambda raw: _count_digits(raw) >= 10,
                     re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b"),
                     lambda v: iban_ok(v.replace(" ", ""))),
    "ip": Detector("ip", lambda raw: raw.count(b".") >= 3 or raw.count(b":") >= 2,
                   re.compile(r"(?<![\w.:])(?:(?:\d{1,3}\.){3}\d{1,3}|[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7})(?![\w.:])"),
                   _ip_ok),
}
ALL_KINDS = tuple(DETECTORS)


# The most specific kinds claim a span first; phone numbers, the loosest pattern, come last.
PRIORITY = ("card", "iban", "ssn", "email", "ip", "phone")


def _always(raw: bytes) -> bool:
    return True


def custom(name: str, pattern: str) -> Detector:
    """A detector from a configured regular expression (no pre-filter: it always runs)."""
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"pattern {name!r} is not a valid regular expression: {exc}") from exc
    return Detector(name, _always, compiled)


@lru_cache(maxsize=64)
def _in_priority(kinds: tuple[str, ...]) -> tuple[Detector, ...]:
    return tuple(DETECTORS[k] for k in PRIORITY if k in kinds)


def find(text: str, raw: bytes, kinds: tuple[str, ...], extra: tuple[Detector, ...] = ()) -> list[tuple[int, int, str]]:
    """Non-overlapping (start, end, kind) spans of PII in `text`, in order."""
    accepted: list[tuple[int, int, str]] = []
    for det in _in_priority(kinds) + tuple(extra):
        if not det.prefilter(raw):
            continue
        for s, e in det.spans(text):
            if all(e <= a or s >= b for a, b, _ in accepted):
                accepted.append((s, e, det.kind))
    accepted.sort()
    return accepted
