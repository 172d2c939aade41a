"""pdistill: distil an aligned teacher LM into a student LM: DCKD, ADPA, or ADPA started from the DCKD student.

    tsalign stage=pdistill method=dckd            # teacher pi_T (this experiment's last DPO policy), student pi_0
    tsalign stage=pdistill method=adpa pdistill.teacher_policy=eval128_s3:pi_1 \\
        pdistill.data=outputs/eval128_s3/iter_0/rank/pairs.jsonl experiment_name=adpa_s3

Teacher, reference and student are causal LMs sharing one tokenizer (checked first: the teacher's token ids
must mean the student's). Two cached steps (tsalign.stages.pdistill.teacher_cache):
 1. teacher distributions, once per dataset: DCKD runs the aligned teacher over every pair's chosen and rejected
    answer; ADPA lets the student answer each prompt once greedily and runs the teacher, then its reference, over
    those answers. Top-k + remainder per response token, cached with a manifest; each model leaves memory
    before the next one loads, and none is in memory while the student trains.
 2. the student trains with transformers' Trainer on the losses of tsalign.algorithms.policy_losses (the released code's
    weights by default: DCKD = 1.0 CE(chosen) + 0.1 KL_chosen + 0.1 KL_rejected; ADPA = 1.0 CE(chosen) - 1.6
    E_q[A]); adpa_dckd runs a DCKD phase, then an ADPA phase from its student, on greedy answers of pdistill.student.
Reports CE and KL(teacher || student) on chosen and rejected (DCKD), or the expected advantage (ADPA), before
and after each phase, on the first 32 examples. Writes iter_<t>/pdistill/policy/: a plain HF checkpoint, like dpo's.

Here: plan, check, run. sources.py: the models and pairs plan declares (run reads them back); data.py: pairs,
tokenizers and the training rows; answers.py: ADPA's greedy answers; teacher_cache.py; trainer.py: the losses in
transformers' Trainer.
"""

from __future__ import annotations

import time

from omegaconf import DictConfig

from tsalign.errors import TsalignError
from tsalign.stages.checks import base_model, check_lengths, is_causal_lm, trained_model
from tsalign.stages.contract import Plan, Stage, StageContext, StageResult, section
from tsalign.stages.pdistill.data import adpa_examples, dckd_examples, encode_pairs, load_pairs, prepare
from tsalign.stages.pdistill.sources import pairs_source, phases, used_models
from tsalign.stages.pdistill.trainer import overall, train
from tsalign.training.saving import write_model


def plan(cfg: DictConfig) -> Plan:
    models = used_models(cfg)
    pairs, data_label = pairs_source(cfg)
    config = {**section(cfg, "policy", "pdistill", "optimizer", "seed"), "data_used": data_label,
              **{f"{key}_used": label for key, (_, label) in models.items()}}
    for key in ("cache_dir", "teacher_batch_size", "logging_steps"):  # bookkeeping: the student does not depend on them
        del config["pdistill"][key]
    if "adpa" in phases(cfg.pdistill.loss):
        config["greedy"] = {k: cfg.sampler[k] for k in ("backend", "max_new_tokens", "max_prompt_tokens")}
    inputs = {key: folder for key, (folder, _) in models.items() if folder is not None}
    return Plan(config, {**inputs, **({"pairs": pairs} if pairs else {})})


def check(cfg: DictConfig) -> None:
    """Every model a causal LM whose positions hold pdistill.max_length (config.json only; sizes are checked
    with the config, tsalign.config.schema.PdistillConfig)."""
    p = cfg.pdistill
    for key, (folder, label) in used_models(cfg).items():
        info = trained_model(folder) if folder else base_model(cfg, "policy")
        if info.config is not None and not is_causal_lm(info.config):
            raise TsalignError(f"pdistill.{key}={label} ({info.name}) is not a causal LM "
                               f"({', '.join(info.config.get('architectures') or ['no architectures'])}): teacher, "
                               "reference and student are language models sharing one tokenizer")
        check_lengths(info, {"pdistill.max_length": p.max_length})


def teacher_calls(caches: dict) -> int:
    """Sequences a teacher LM ran over (the aligned teacher, and its reference on ADPA's greedy answers),
    built now or reused from the cache: what this method asks of its teachers, as rank's teacher_calls
    counts what TS-Align asks of its own."""
    return sum(len(c.sequences) * (2 if name == "greedy" else 1) for name, c in caches.items())


def run(ctx: StageContext) -> StageResult:
    cfg, p = ctx.cfg, ctx.cfg.pdistill
    s = prepare(ctx)  # the models plan declared; a foreign tokenizer is refused before any model loads
    pairs = load_pairs(cfg, ctx.inputs.get("pairs"))
    kept = encode_pairs(s.tok, pairs, p.max_length)
    t0 = time.time()
    examples, caches = {}, {}
    if "dckd" in phases(p.loss):
        examples["dckd"], caches["pairs"] = dckd_examples(s, kept)
    if "adpa" in phases(p.loss):
        examples["adpa"], caches["greedy"] = adpa_examples(s, kept)
    teacher_s, t1 = time.time() - t0, time.time()
    model, trained = train(ctx, s, examples)

    write_model(model, s.tok, ctx.directory / "policy")
    counts = {"pairs": len(pairs), "pairs_used": len(kept), "pairs_dropped": len(pairs) - len(kept),
              **{f"{name}_cache": "reused" if c.reused else "built" for name, c in caches.items()},
              **{f"{name}_response_tokens": int(c.tensors["offsets"][-1]) for name, c in caches.items()},
              "teacher_calls": teacher_calls(caches), **overall(trained, phases(p.loss)),
              **trained, "teacher_s": round(teacher_s, 2), "train_s": round(time.time() - t1, 2)}
    ctx.tracker.log({f"pdistill/{k}": v for k, v in counts.items() if isinstance(v, (int, float))})
    extra = {"device": s.device, **{f"{k}_dir": str(v) for k, v in s.dirs.items()},
             "teacher_caches": {name: str(c.directory) for name, c in caches.items()}}
    return StageResult(counts, {"policy": ctx.directory / "policy"}, extra)


STAGE = Stage("pdistill", plan, run, check)
