"""A watch on the event loop for the soak: any stretch longer than a bound in which it ran nothing else.

asyncio's debug mode logs each scheduled callback that took too long ("Executing ... took"), but uvloop
times only those, never what a socket's read runs inside libuv (which reads again and again, up to 32
times, before anything else runs). A timer that should fire every few milliseconds sees every stall,
whatever held the loop: it cannot say what did, the debug log usually can.
"""

from __future__ import annotations

import asyncio
import logging
import time

log = logging.getLogger("wardgate.loop")

TICK = 0.002  # seconds between the watch's wake-ups


async def watch(bound: float) -> None:
    """Log every gap between wake-ups over `bound` seconds (beyond the tick itself), until cancelled."""
    last = time.perf_counter()
    while True:
        await asyncio.sleep(TICK)
        now = time.perf_counter()
        held = now - last - TICK
        if held > bound:
            log.warning("event loop held for %.0f ms", held * 1000)
        last = now
