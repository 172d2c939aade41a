"""`tsalign stage=plan`: per stage, the models it will hold, their dtypes and the memory per device for the
chosen launch, the steps per iteration, and whether it fits the visible devices (the arithmetic:
tsalign.stages.resource_plan and tsalign.algorithms.memory). Reads config.json files only.

    tsalign stage=plan model=llama
"""

from __future__ import annotations

from omegaconf import DictConfig

from tsalign.algorithms.memory import GIB
from tsalign.stages.placement import Target, target_of
from tsalign.stages.registry import PIPELINE
from tsalign.stages.resource_plan import (
    STAGE_PLANS,
    StagePlan,
    breakdown,
    count_text,
    shortfall,
    step_lines,
    training_prompts,
)


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def verdict(plan: StagePlan, target: Target) -> str:
    need = plan.per_device
    unread = [row.role for row in plan.rows if row.memory is None and not row.model.served]
    if need is None:
        return "-> not estimated (no model read)" if unread else "-> holds no model here"
    why = shortfall(plan, target)
    missing = f" (not counted: {', '.join(unread)})" if unread else ""
    if why:
        return f"-> does not fit: {why}{missing}"
    return _fits(plan, target, need) + missing


def _fits(plan: StagePlan, target: Target, need: int) -> str:
    has = target.device_bytes
    if has is None:
        return f"-> needs {need / GIB:.1f} GiB per GPU (no GPU visible to compare with)"
    if target.gpus:
        left = has - need
        return f"-> fits: {need / GIB:.1f} of {has / GIB:.1f} GiB per GPU ({left / GIB:.1f} left for activations)"
    total = need * plan.processes
    return f"-> fits: {total / GIB:.1f} of {has / GIB:.1f} GiB host RAM" + \
        (f" ({plan.processes} processes x {need / GIB:.1f})" if plan.processes > 1 else "")


def render_stage(plan: StagePlan, target: Target) -> list[str]:
    header = ["role", "name", "dtype", "params", "GiB/device", "breakdown", "path"]
    rows = [[r.role, r.model.name, r.dtype, count_text(r.model.params),
             f"{r.memory.total / GIB:.1f}" if r.memory is not None else "-",
             breakdown(r) + (f" ({r.note})" if r.note and r.memory is not None else ""), r.model.path]
            for r in plan.rows]
    held = "; held together" if plan.together else "; one at a time" if len(plan.rows) > 1 else ""
    lines = [f"{plan.stage}  [{plan.launch}{held}]", *_table([header, *rows])]
    lines += [f"  note: {n}" for n in plan.notes]
    return [*lines, f"  {verdict(plan, target)}"]


def device_lines(target: Target) -> list[str]:
    if target.gpus:
        return [f"devices: {len(target.gpus)} GPU{'s' * (len(target.gpus) > 1)} visible"] + \
            [f"  cuda:{i} {name}, {total / GIB:.1f} GiB" for i, (name, total) in enumerate(target.gpus)]
    ram = f"{target.host_bytes / GIB:.1f} GiB MemTotal" if target.host_bytes else "MemTotal unknown"
    if target.gpu:
        return [f"devices: no GPU visible: planned for CUDA GPUs (device=cuda); host RAM {ram}"]
    return [f"devices: no GPU visible: CPU run, memory is host RAM ({ram}); transformers loads every model in "
            "float32 here (tsalign.engines.models.torch_dtype)"]


def render(cfg: DictConfig, target: Target) -> str:
    lines = [f"[plan] iteration {cfg.iteration}: estimates from each model's config.json (no weights loaded); "
             "activations are not counted: the space left on each device is theirs", *device_lines(target), ""]
    dpo_processes = 1
    for stage in PIPELINE:
        plan = STAGE_PLANS[stage](cfg, target)
        dpo_processes = plan.processes if stage == "dpo" else dpo_processes
        lines += [*render_stage(plan, target), ""]
    lines += ["steps per iteration (at most one pair per prompt: "
              f"{training_prompts(cfg)} prompts, data.prompts_per_iteration / data.max_prompts):",
              *[f"  {line}" for line in step_lines(cfg, dpo_processes)]]
    return "\n".join(lines)


def main(cfg: DictConfig) -> None:
    print(render(cfg, target_of(cfg)))
