"""Text PostgreSQL cannot read: a NUL character (the server reads a string only up to one, and text
and jsonb cannot hold one) or a lone UTF-16 surrogate (JSON can carry "\\ud800"; UTF-8 has no encoding
for it). The HTTP doors refuse such text where it arrives, so no rule decides on text the server would
read differently and no record of it is one the store cannot take (the journal's reader replaces what
still gets through: recording/journal.py `storable`)."""

from __future__ import annotations

import re

_UNREADABLE = re.compile("[\x00\ud800-\udfff]")

UNREADABLE_MESSAGE = "contains a NUL character or a lone UTF-16 surrogate, which PostgreSQL cannot read"


def unreadable(text: str) -> bool:
    """Whether `text` holds a character PostgreSQL cannot read."""
    return _UNREADABLE.search(text) is not None
