"""`accelerate launch` as stage=loop starts its multi-process stages, ending in one tsalign line when a
process fails instead of the launcher's traceback.

    tsalign-launch --multi_gpu --num_processes 2 -m tsalign.cli stage=dpo iteration=0
    python -m tsalign.pipeline.launch ...     # the same (what stage=loop runs)

Same arguments as `accelerate launch` (its parser and launchers run unchanged). When a process dies, torch
elastic stops the others and accelerate re-raises ChildFailedError: a page of launcher frames that buries which
process failed and how. A process killed by a signal (the kernel's out-of-memory killer sends SIGKILL) printed
nothing itself, so that line is the only report the user gets.
"""

from __future__ import annotations

import subprocess
import sys

KEPT = "finished work is kept: rerun the same command to continue"


def failure_line(rank: int, processes: int | str, exitcode: int, signal_name: str) -> str:
    """One line for the first process that failed (torch elastic's root cause)."""
    who = f"process {rank} of {processes}"
    if exitcode < 0:
        why = " (the kernel's out-of-memory killer sends it: see `dmesg`)" if signal_name == "SIGKILL" else ""
        return f"{who} was killed by {signal_name}{why}; accelerate stopped the others; {KEPT}"
    return f"{who} exited with code {exitcode} (its error is above); accelerate stopped the others; {KEPT}"


def main(argv: list[str] | None = None) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(argv)
    try:
        launch_command(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        line = failure_line(rank, args.num_processes or "?", failure.exitcode, failure.signal_name())
    except subprocess.CalledProcessError as e:  # one process (accelerate's simple launcher): its error is above
        if e.returncode < 0:
            import signal

            line = failure_line(0, 1, e.returncode, signal.Signals(-e.returncode).name)
        else:
            return e.returncode
    else:
        return 0
    print(f"tsalign: error: {line}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
