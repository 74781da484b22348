"""The gateway with a classifier that misreads one statement: what a gateway read past would do.

For the tripwire's end-to-end test only: `python tests/misread_gateway.py --config ... serve` runs the
real gateway, whose policy classifies MISREAD as the harmless SELECT it starts with.
"""

from __future__ import annotations

from wardgate.cli import main
from wardgate.policy import guardrails

MISREAD = "select 1 as innocent; drop table tripwire_victim"
PRETEND = "select 1 as innocent"
_classify = guardrails.classify


def _misread(text: str):  # noqa: ANN202
    return _classify(PRETEND if text == MISREAD else text)


guardrails.classify = _misread

if __name__ == "__main__":
    main()
