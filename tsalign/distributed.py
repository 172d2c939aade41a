"""Rank awareness under `accelerate launch` (DDP, DeepSpeed, FSDP): every process works, one writes.

    accelerate launch --multi_gpu --num_processes 2 -m tsalign.cli stage=dpo iteration=0
    accelerate launch --config_file conf/accelerate/deepspeed_zero2.yaml -m tsalign.cli stage=dpo iteration=0
    accelerate launch --multi_gpu --num_processes 2 -m tsalign.cli stage=generate iteration=0   # prompt shards

The launcher sets WORLD_SIZE / RANK / LOCAL_RANK; a plain `tsalign` run has none and every function
here is then a no-op for one process. The runner (tsalign.pipeline.runner) lets the main process take the
stage lock, write the manifest and the tracker run; the others wait at a barrier and read. On a CPU
machine the process group is gloo (accelerate's MULTI_CPU); on GPUs NCCL, one device per LOCAL_RANK.
"""

from __future__ import annotations

import functools
import os
import sys


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def launched() -> bool:
    """True inside `accelerate launch` / torchrun with more than one process."""
    return world_size() > 1


def is_main() -> bool:
    return rank() == 0


@functools.lru_cache(maxsize=1)
def state():
    """accelerate's PartialState: initialises the process group once (gloo on CPU, NCCL on GPUs)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def finish() -> None:
    """The end of a launched process that did its work: the process groups destroyed (torch documents
    destroy_process_group at the end of a program), then the exit handlers run and the process ends without
    the interpreter's teardown. Why not a plain return: gloo's worker thread releases the last collective's
    tensors after the collective has returned, and that needs the GIL; a thread asking for the GIL while
    CPython finalizes is ended by pthread_exit, which unwinds through C++ code that may not throw:
    "terminate called without an active exception", SIGABRT, and the launcher reports finished work as a
    failure (gdb: ProcessGroupGloo::runLoop -> ~AsyncAllgatherWork -> decref_pyobject -> take_gil ->
    PyThread_exit_thread; 3 of 5 two-process launches on a busy 2-core machine). On the success path only:
    an error already ends the process non-zero, and NCCL's teardown may wait on a rank that failed."""
    if not launched():
        return
    import atexit

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    atexit._run_exitfuncs()  # what the interpreter's exit would run: trackers' and logging's handlers
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def collective_device():
    """Where a collective's tensors must live: NCCL (accelerate's backend for DDP, DeepSpeed and FSDP on
    GPUs) takes CUDA tensors only ("No backend type associated with device type cpu"); gloo takes CPU ones."""
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def narrow_visible_gpus(stage: str, trains: bool) -> str | None:
    """A stage that trains one model copy per process (tsalign.stages.registry: `trains`), run in one process
    (no `accelerate launch`) on a node with several GPUs, keeps the first visible GPU only
    (CUDA_VISIBLE_DEVICES, set before CUDA starts, which torch documents as read then): else transformers'
    Trainer wraps the model in nn.DataParallel (TRL's DPOTrainer refuses that after the policy has loaded).
    Returns the note to print, or None."""
    if launched() or not trains:
        return None
    import torch

    count = torch.cuda.device_count()
    if count <= 1:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    first = visible.split(",")[0].strip() if visible else "0"
    all_of_them = (f"accelerate launch --multi_gpu --num_processes {count} -m tsalign.cli stage={stage} "
                   f"(stage=loop: launch.processes={count})")
    os.environ["CUDA_VISIBLE_DEVICES"] = first
    if torch.cuda.is_initialized() or torch.cuda.device_count() != 1:  # CUDA counted the devices already
        from tsalign.errors import TsalignError

        raise TsalignError(f"{count} GPUs are visible and stage={stage} runs in one process: set "
                           f"CUDA_VISIBLE_DEVICES={first}, or train on all of them: {all_of_them}")
    return (f"[tsalign] note: {count} GPUs visible; stage={stage} runs in one process on GPU {first} "
            f"(CUDA_VISIBLE_DEVICES={first}); to train on all of them: {all_of_them}")


def barrier() -> None:
    if launched():
        state().wait_for_everyone()


def from_main(compute):
    """`compute()` run on the main process only, its result (or its error) on every process: decisions
    such as "already done" must agree, and an error on the main process must not leave the others
    waiting at the next collective."""
    if not launched():
        return compute()
    import torch.distributed as dist

    state()
    box = [None]
    if is_main():
        try:
            box = [(True, compute())]
        except Exception as e:  # noqa: BLE001 -- re-raised below, on every process
            box = [(False, e)]
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise value
    return value


def on_every_process(compute) -> list:
    """`compute()` run on every process; every process gets the list of results by rank. An error on
    any process is raised on all of them (the lowest rank's), after every process has finished its own
    share: no process is left waiting at the next collective, and finished work elsewhere is kept."""
    if not launched():
        return [compute()]
    import pickle

    import torch.distributed as dist

    state()
    try:
        mine = (True, compute())
    except Exception as e:  # noqa: BLE001 -- re-raised below, on every process
        mine = (False, e)
        try:
            pickle.dumps(e)
        except Exception:  # noqa: BLE001 -- an error that cannot travel goes as its text
            mine = (False, RuntimeError(f"process {rank()}: {type(e).__name__}: {e}"))
    results = [None] * world_size()
    dist.all_gather_object(results, mine)
    for ok, value in results:
        if not ok:
            raise value
    return [value for _, value in results]


def mean_over_processes(value: float, weight: float = 1.0) -> float:
    """The weighted mean of a per-process number (a loss over a slice of the global batch)."""
    if not launched():
        return value
    import torch
    import torch.distributed as dist

    state()
    t = torch.tensor([value * weight, weight], dtype=torch.float64, device=collective_device())
    dist.all_reduce(t)
    return (t[0] / t[1]).item()
