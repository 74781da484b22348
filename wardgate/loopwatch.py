"""A watch on the event loop for the soak: any stretch longer than a bound in which it ran nothing else.

asyncio's debug mode logs each scheduled callback that took too long ("Executing ... took"), but uvloop
times only those, never what a socket's read runs inside libuv (which reads again and again, up to 32
times, before anything else runs). A timer that should fire every few milliseconds sees every stall,
whatever held the loop: it cannot say what did, the debug log usually can. A stall counts when the
loop's thread was running through it (its CPU time): on a busy machine a process also waits for a CPU,
which is the machine's doing, not a session's.
"""

from __future__ import annotations

import asyncio
import logging
import time

log = logging.getLogger("wardgate.loop")

TICK = 0.002  # seconds between the watch's wake-ups


async def watch(bound: float) -> None:
    """Log every gap between wake-ups over `bound` seconds (beyond the tick itself), until cancelled."""
    last, last_cpu = time.perf_counter(), time.thread_time()
    while True:
        await asyncio.sleep(TICK)
        now, cpu = time.perf_counter(), time.thread_time()
        held, ran = now - last - TICK, cpu - last_cpu
        if held > bound and ran > bound:
            log.warning("event loop held for %.0f ms (%.0f ms of it running)", held * 1000, ran * 1000)
        last, last_cpu = now, cpu
