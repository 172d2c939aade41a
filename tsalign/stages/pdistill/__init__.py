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
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from omegaconf import DictConfig

from tsalign.artifacts.store import atomic_dir, config_hash, fingerprint, read_manifest, stage_dir, verify_output
from tsalign.config.choices import PdistillLoss
from tsalign.errors import TsalignError
from tsalign.stages.checks import base_model, check_lengths, is_causal_lm, trained_model
from tsalign.stages.contract import Plan, Stage, StageContext, StageResult, section
from tsalign.stages.lineage import base_model_dir, experiment_dir, finished_output
from tsalign.stages.pdistill.teacher_cache import (
    Sequence,
    cached,
    encode,
    reference_logp,
    release_device_memory,
    sequences_hash,
    teacher_topk,
)

MODELS = ("teacher_policy", "teacher_reference", "student")
_PI = re.compile(r"^pi_(\d+|T)$")


def phases(loss: str) -> list[str]:
    return {PdistillLoss.dckd: ["dckd"], PdistillLoss.adpa: ["adpa"], PdistillLoss.adpa_dckd: ["dckd", "adpa"]}[
        PdistillLoss(loss)]


def model_ref(cfg: DictConfig, key: str) -> tuple[Path | None, str]:
    """(folder, label) of pdistill.<key>: pi_0 (the base policy: folder None), pi_<n> / pi_T of this experiment
    or <experiment>:pi_<n> / <experiment>:pi_T of another one (its iter_<n-1>/dpo/policy), or a model folder."""
    text = str(cfg.pdistill[key])
    where = f"pdistill.{key}={text}"
    name, sep, pi = text.rpartition(":")
    if not (sep and name and _PI.match(pi)):
        name, pi = "", text
    if not _PI.match(pi):
        folder = Path(text).expanduser()
        if not (folder / "config.json").is_file():
            raise TsalignError(f"{where}: not a model folder (no config.json) nor pi_<n> / pi_T / <experiment>:pi_<n>")
        return folder.resolve(), text
    n = _PI.match(pi).group(1)
    if n == "0":
        return None, cfg.policy.name
    exp = (Path(cfg.paths.outputs) / name).resolve() if name else experiment_dir(cfg)
    if n == "T":
        done = [int(d.parent.name[5:]) for d in exp.glob("iter_*/dpo") if d.parent.name[5:].isdigit()
                and read_manifest(d) is not None]
        if not done:
            raise TsalignError(f"{where}: {exp} has no finished dpo stage, so no aligned policy; run the TS-Align loop "
                               "there first (`tsalign stage=loop`) or name the teacher's folder")
        n = str(max(done) + 1)
    directory = stage_dir(exp, int(n) - 1, "dpo")
    if read_manifest(directory) is None:
        raise TsalignError(f"{where}: {directory} is not finished; run `tsalign stage=dpo iteration={int(n) - 1}` "
                           "there first or name a model folder")
    return verify_output(directory / "policy"), f"{name + ':' if name else ''}pi_{n}"


def pairs_source(cfg: DictConfig) -> tuple[Path | None, str]:
    data = cfg.pdistill.data
    if data is None:
        return finished_output(cfg, cfg.iteration, "rank", "pairs.jsonl", "pdistill"), f"iter_{cfg.iteration}/rank"
    if data == "llamafactory_dpo":
        return None, data
    path = Path(data).expanduser()
    if not path.is_file():
        raise TsalignError(f"pdistill.data={data}: no such file (a JSONL of prompt / chosen / rejected, e.g. a rank "
                           "stage's pairs.jsonl, or llamafactory_dpo)")
    return verify_output(path.resolve()), str(data)


def used_models(cfg: DictConfig) -> dict[str, tuple[Path | None, str]]:
    keys = MODELS if "adpa" in phases(cfg.pdistill.loss) else ("teacher_policy", "student")
    return {key: model_ref(cfg, key) for key in keys}


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
    """Sizes, and every model a causal LM whose positions hold pdistill.max_length (config.json only)."""
    p = cfg.pdistill
    for key in ("top_k", "batch_size", "teacher_batch_size", "gradient_accumulation_steps", "max_length"):
        if p[key] < 1:
            raise TsalignError(f"pdistill.{key}={p[key]} must be >= 1")
    if p.max_pairs is not None and p.max_pairs < 1:
        raise TsalignError(f"pdistill.max_pairs={p.max_pairs} must be >= 1 (null: every pair)")
    for key, (folder, label) in used_models(cfg).items():
        info = trained_model(folder) if folder else base_model(cfg, "policy")
        if info.config is not None and not is_causal_lm(info.config):
            raise TsalignError(f"pdistill.{key}={label} ({info.name}) is not a causal LM "
                               f"({', '.join(info.config.get('architectures') or ['no architectures'])}): teacher, "
                               "reference and student are language models sharing one tokenizer")
        check_lengths(info, {"pdistill.max_length": p.max_length})


def check_tokenizers(dirs: dict[str, Path]) -> None:
    """Teacher and reference must tokenize exactly like the student: the same token -> id map."""
    from tsalign.engines.models import load_tokenizer

    student = load_tokenizer(dirs["student"]).get_vocab()
    for key in ("teacher_policy", "teacher_reference"):
        if key not in dirs or dirs[key] == dirs["student"]:
            continue
        vocab = load_tokenizer(dirs[key]).get_vocab()
        if vocab != student:
            first = sorted(set(vocab.items()) ^ set(student.items()), key=lambda kv: kv[1])[0]
            raise TsalignError(f"pdistill.{key} ({dirs[key]}) does not share the student's tokenizer ({len(vocab)} vs "
                               f"{len(student)} tokens, first difference {first}): its token ids must mean the "
                               "student's; pick a teacher and reference of the student's family, or set "
                               "pdistill.student to a model with the teacher's tokenizer")


def shared_vocab(dirs: dict[str, Path]) -> int:
    """Logit columns all models have (embeddings are often padded past the tokenizer)."""
    return min(json.loads((d / "config.json").read_text())["vocab_size"] for d in dirs.values())


def load_pairs(cfg: DictConfig, path: Path | None) -> list[dict]:
    from tsalign.data import load_human_pairs

    pairs = load_human_pairs(str(path) if path else cfg.pdistill.data, cfg.paths.cache)
    pairs = pairs[: cfg.pdistill.max_pairs] if cfg.pdistill.max_pairs else pairs
    if not pairs:
        raise TsalignError(f"no preference pairs in {path or cfg.pdistill.data}; pdistill needs at least one")
    return pairs


def prompt_key(pair: dict) -> str:
    return json.dumps(pair["prompt"], sort_keys=True, ensure_ascii=False)


def greedy_answers(cfg: DictConfig, student_dir: Path, prompts: list[list[dict]]) -> list[str]:
    """One greedy answer per prompt from the student (ADPA's y_hat), with the configured sampler."""
    from tsalign.engines.sampling.resumable import prompts_per_call
    from tsalign.progress import progress
    from tsalign.stages.factory import open_sampler

    params = greedy_params(cfg)
    sampler = open_sampler(cfg, student_dir, cfg.seed)
    # greedy answers do not depend on the call they are in: a vLLM engine on a GPU takes many prompts per call
    per_call = max(cfg.sampler.batch_size, prompts_per_call(sampler, 1))
    answers: list[str] = []
    try:
        with progress(len(prompts), "student greedy answers", "prompt") as bar:
            for start in range(0, len(prompts), per_call):
                chunk = prompts[start: start + per_call]
                answers += [c[0].text for c in sampler.generate(chunk, params)]
                bar.update(len(chunk))
    finally:
        sampler.close()
    return answers


def greedy_params(cfg: DictConfig):
    from tsalign.engines.sampling import SamplingParams

    s = cfg.sampler
    return SamplingParams(n=1, temperature=0.0, top_p=1.0, max_new_tokens=s.max_new_tokens,
                          max_prompt_tokens=s.max_prompt_tokens, seed=cfg.seed)


# ---------------------------------------------------------------- training


@dataclass(frozen=True)
class Example:
    """One training row: the pair's chosen answer (CE; DCKD: KL) and a second sequence with teacher rows
    (DCKD: the rejected answer; ADPA: the student's greedy answer, with the reference's log-probs)."""

    chosen: Sequence
    chosen_rows: dict | None
    other: Sequence
    other_rows: dict


def collate(examples: list[Example], pad_id: int) -> dict:
    """chosen sequences first, then the others; per position t the tensors describe the token at t + 1."""
    import torch

    seqs = [(e.chosen, e.chosen_rows) for e in examples] + [(e.other, e.other_rows) for e in examples]
    n, width, k = len(seqs), max(len(s.ids) for s, _ in seqs), examples[0].other_rows["ids"].shape[-1]
    batch = {"input_ids": torch.full((n, width), pad_id, dtype=torch.long),
             "attention_mask": torch.zeros((n, width), dtype=torch.long),
             "mask": torch.zeros((n, width - 1), dtype=torch.bool),
             "teacher_ids": torch.zeros((n, width - 1, k), dtype=torch.long),
             "teacher_probs": torch.zeros((n, width - 1, k)), "teacher_rest": torch.zeros((n, width - 1)),
             "reference_logp": torch.zeros((n, width - 1, k))}
    for i, (seq, rows) in enumerate(seqs):
        length, span = len(seq.ids), slice(seq.start - 1, len(seq.ids) - 1)
        batch["input_ids"][i, :length] = torch.tensor(seq.ids)
        batch["attention_mask"][i, :length] = 1
        batch["mask"][i, span] = True
        if rows is not None:
            batch["teacher_ids"][i, span] = rows["ids"].long()
            batch["teacher_probs"][i, span] = rows["probs"]
            batch["teacher_rest"][i, span] = rows["rest"]
            if "ref_logp" in rows:
                batch["reference_logp"][i, span] = rows["ref_logp"]
    batch["targets"] = batch["input_ids"][:, 1:].clone()
    return batch


def batch_loss(model, batch: dict, phase: str, p: DictConfig):
    """(loss, its parts as floats) of one collated batch (tsalign.algorithms.policy_losses)."""
    from tsalign.algorithms.policy_losses import (
        adpa_loss,
        adpa_term,
        advantage,
        dckd_loss,
        token_cross_entropy,
        topk_forward_kl,
    )

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    c, o = slice(0, logits.shape[0] // 2), slice(logits.shape[0] // 2, None)
    mask, ids = batch["mask"], batch["teacher_ids"]
    ce = token_cross_entropy(logits[c], batch["targets"][c], mask[c])
    if phase == "dckd":
        kl_c = topk_forward_kl(ids[c], batch["teacher_probs"][c], batch["teacher_rest"][c], logits[c], mask[c])
        kl_r = topk_forward_kl(ids[o], batch["teacher_probs"][o], batch["teacher_rest"][o], logits[o], mask[o])
        loss, parts = dckd_loss(ce, kl_c, kl_r, p.ce_weight, p.kl_weight), {"kl_chosen": kl_c, "kl_rejected": kl_r}
    else:
        adv = advantage(batch["teacher_probs"][o].clamp_min(1e-30).log(), batch["reference_logp"][o], p.advantage_clip)
        expected = adpa_term(logits[o], ids[o], adv, mask[o])
        loss, parts = adpa_loss(ce, expected, p.ce_weight, p.advantage_weight), {"expected_advantage": expected}
    return loss, {"ce_chosen": ce.item(), **{k: v.item() for k, v in parts.items()}}


MEASURED = 32  # examples the before / after numbers are taken on (the first ones: the same both times)


def measure(model, examples: list[Example], phase: str, p: DictConfig, pad_id: int, device: str) -> dict:
    """The loss parts over the first MEASURED examples, without training (before / after a phase)."""
    import torch

    sums: dict[str, float] = {}
    examples = examples[:MEASURED]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(examples), p.batch_size):
            chunk = examples[start: start + p.batch_size]
            batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
            for k, v in batch_loss(model, batch, phase, p)[1].items():
                sums[k] = sums.get(k, 0.0) + v * len(chunk)
    model.train(was_training)
    return {k: round(v / len(examples), 4) for k, v in sums.items()}


def make_trainer(cfg: DictConfig, model, examples: list[Example], phase: str, pad_id: int, output_dir: Path,
                 device: str, report_to: list[str]):
    import torch
    from transformers import PrinterCallback, Trainer, TrainingArguments

    p, o = cfg.pdistill, cfg.optimizer

    class PdistillTrainer(Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.parts: dict[str, list[float]] = {}  # loss parts since the last log

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, parts = batch_loss(model, inputs, phase, p)
            for k, v in parts.items():
                self.parts.setdefault(k, []).append(v)
            return (loss, None) if return_outputs else loss

        def log(self, logs, start_time=None):
            logs = {**logs, **{k: sum(v) / len(v) for k, v in self.parts.items() if v}}
            self.parts = {}
            super().log(logs, start_time)

    gpu = device.startswith("cuda")
    if not 0 <= o.warmup_ratio < 1:
        raise TsalignError(f"optimizer.warmup_ratio={o.warmup_ratio} must be in [0, 1)")
    try:
        args = TrainingArguments(
            output_dir=str(output_dir), num_train_epochs=p.epochs, max_steps=p.max_steps,
            per_device_train_batch_size=p.batch_size, gradient_accumulation_steps=p.gradient_accumulation_steps,
            learning_rate=o.learning_rate, lr_scheduler_type=o.lr_scheduler_type, weight_decay=o.weight_decay,
            max_grad_norm=o.max_grad_norm, warmup_steps=o.warmup_ratio, optim=o.name, logging_steps=p.logging_steps,
            seed=cfg.seed, save_strategy="no", report_to=report_to, use_cpu=not gpu,
            bf16=gpu and torch.cuda.is_bf16_supported(), gradient_checkpointing=False, disable_tqdm=True,
            remove_unused_columns=False)
        trainer = PdistillTrainer(model=model, args=args, train_dataset=examples,
                                  data_collator=partial(collate, pad_id=pad_id))
    except (ValueError, TypeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TsalignError(f"pdistill setup rejected the config (pdistill.* / optimizer.*): {first}") from None
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(log_callback(phase, o.learning_rate))
    return trainer


def log_callback(phase: str, learning_rate: float):
    """One short line per logged step; a diverging run stops with an error naming the learning rate."""
    from transformers import TrainerCallback

    from tsalign.training.divergence import diverged, divergence

    class LogCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            first = next((h["loss"] for h in state.log_history if "loss" in h), None)
            reason = divergence(logs or {}, first)
            if reason:
                raise diverged(f"pdistill ({phase})", f"at step {state.global_step}/{state.max_steps}", reason,
                               "optimizer.learning_rate", learning_rate)
            if logs and "loss" in logs:
                parts = " ".join(f"{k} {logs[k]:.4f}" for k in ("ce_chosen", "kl_chosen", "kl_rejected",
                                                                 "expected_advantage") if k in logs)
                print(f"[pdistill] {phase} step {state.global_step}/{state.max_steps} loss {logs['loss']:.4f} {parts}",
                      flush=True)

    return LogCallback()


# ---------------------------------------------------------------- the stage


@dataclass
class Setup:
    """What the teacher passes of one run share: the models, the student's tokenizer and the cache settings."""

    cfg: DictConfig
    dirs: dict[str, Path]
    fingerprints: dict[str, str]
    tok: object
    pad_id: int
    vocab: int
    device: str

    @property
    def root(self) -> Path:
        p = self.cfg.pdistill
        return Path(p.cache_dir).expanduser() if p.cache_dir else Path(self.cfg.paths.cache) / "teacher_topk"

    def teacher_kw(self) -> dict:
        p = self.cfg.pdistill
        return {"k": p.top_k, "vocab": self.vocab, "batch_size": p.teacher_batch_size, "device": self.device,
                "dtype": self.cfg.policy.dtype, "pad_id": self.pad_id}

    def identity(self, kind: str, *models: str, **more) -> dict:
        return {"kind": kind, **{m: self.fingerprints[m] for m in models}, "top_k": self.cfg.pdistill.top_k,
                "vocab": self.vocab, "dtype": str(self.cfg.policy.dtype), **more}


def dckd_examples(s: Setup, kept: list[tuple]):
    """DCKD rows: the teacher's top-k on every pair's chosen and rejected answer (cached)."""
    seqs = [q for _, c, r in kept for q in (c, r)]
    cache = cached(s.root, s.identity("pairs", "teacher_policy", sequences=sequences_hash(seqs)),
                   lambda: (seqs, teacher_topk(s.dirs["teacher_policy"], seqs, **s.teacher_kw()), {}),
                   "teacher (chosen + rejected)")
    return [Example(c, cache.rows(2 * i), r, cache.rows(2 * i + 1)) for i, (_, c, r) in enumerate(kept)], cache


def adpa_examples(s: Setup, kept: list[tuple]):
    """ADPA rows: the pair's chosen answer (CE) and the student's greedy answer to its prompt, with the teacher's
    top-k and the reference's log-probs on it (cached with the answers: the student does not answer again)."""
    cfg, p = s.cfg, s.cfg.pdistill
    prompts = list({prompt_key(pair): pair["prompt"] for pair, _, _ in kept}.items())

    def build():
        # a vLLM engine starts on the device's free memory: nothing an earlier phase loaded may still hold it
        release_device_memory()
        answers = greedy_answers(cfg, s.dirs["student"], [m for _, m in prompts])
        encoded = [(key, encode(s.tok, m, [{"role": "assistant", "content": a}], p.max_length))
                   for (key, m), a in zip(prompts, answers)]
        seqs = [q for _, q in encoded if q is not None]
        tensors = teacher_topk(s.dirs["teacher_policy"], seqs, **s.teacher_kw())
        tensors["ref_logp"] = reference_logp(s.dirs["teacher_reference"], seqs, tensors["ids"], tensors["offsets"],
                                             s.vocab, p.teacher_batch_size, s.device, cfg.policy.dtype, s.pad_id)
        return seqs, tensors, {"prompt_keys": [k for k, q in encoded if q is not None], "answers": answers}

    identity = s.identity("greedy", "teacher_policy", "teacher_reference", "student",
                          prompts=config_hash([k for k, _ in prompts]), max_length=p.max_length,
                          greedy={**greedy_params(cfg).as_dict(), "backend": str(cfg.sampler.backend)})
    cache = cached(s.root, identity, build, "teacher + reference (greedy answers)")
    where = {k: i for i, k in enumerate(cache.extra["prompt_keys"])}
    index = [(c, where.get(prompt_key(pair))) for pair, c, _ in kept]
    return [Example(c, None, cache.sequences[i], cache.rows(i)) for c, i in index if i is not None], cache


def train(ctx: StageContext, s: Setup, examples: dict[str, list[Example]]) -> tuple[object, dict]:
    """The student after every phase of pdistill.loss, and per phase its steps, losses and before / after parts."""
    from tsalign.engines.models import load_causal_lm
    from tsalign.training.divergence import check_weights, largest_weight

    cfg, p = ctx.cfg, ctx.cfg.pdistill
    model = load_causal_lm(s.dirs["student"], "float32", s.device)  # fp32 master weights, as dpo's full training
    use_cache, model.config.use_cache = model.config.use_cache, False
    largest_before, counts = largest_weight(model), {}
    for phase in phases(p.loss):
        rows = examples[phase]
        if not rows:
            raise TsalignError(f"pdistill {phase}: no training rows (no answer fits pdistill.max_length="
                               f"{p.max_length}); raise it")
        before = measure(model, rows, phase, p, s.pad_id, s.device)
        trainer = make_trainer(cfg, model, rows, phase, s.pad_id, ctx.directory / "_work" / phase, s.device,
                               ctx.tracker.report_to)
        trainer.train()
        after = measure(model, rows, phase, p, s.pad_id, s.device)
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        counts.update({f"{phase}_examples": len(rows), f"{phase}_steps": trainer.state.global_step,
                       f"{phase}_first_loss": round(losses[0], 4) if losses else None,
                       f"{phase}_last_loss": round(losses[-1], 4) if losses else None,
                       **{f"{phase}_{k}_before": v for k, v in before.items()},
                       **{f"{phase}_{k}_after": v for k, v in after.items()}})
        shown = ", ".join(f"{k} {before[k]:.4f} -> {after[k]:.4f}" for k in before)
        print(f"[pdistill] {phase}: {len(rows)} examples, {trainer.state.global_step} steps; {shown}", flush=True)
    model.config.use_cache = use_cache
    check_weights(model, "pdistill", "optimizer.learning_rate", cfg.optimizer.learning_rate, largest_before)
    return model, counts


def overall(trained: dict, names: list[str]) -> dict:
    """Steps and loss over the phases together (the summary's figures; each phase's are kept beside them)."""
    return {"steps": sum(trained.get(f"{n}_steps") or 0 for n in names),
            "first_loss": trained.get(f"{names[0]}_first_loss"), "last_loss": trained.get(f"{names[-1]}_last_loss")}


def teacher_calls(caches: dict) -> int:
    """Sequences a teacher LM ran over (the aligned teacher, and its reference on ADPA's greedy answers),
    built now or reused from the cache: what this method asks of its teachers, as rank's teacher_calls
    counts what TS-Align asks of its own."""
    return sum(len(c.sequences) * (2 if name == "greedy" else 1) for name, c in caches.items())


def run(ctx: StageContext) -> StageResult:
    from tsalign.engines.models import load_tokenizer, pick_device

    cfg, p = ctx.cfg, ctx.cfg.pdistill
    dirs = {key: folder or base_model_dir(cfg, cfg.policy) for key, (folder, _) in used_models(cfg).items()}
    check_tokenizers(dirs)  # before any model loads
    tok = load_tokenizer(dirs["student"], chat=True)
    fingerprints = dict(ctx.stamp["inputs"])  # hashed by the runner; the base policy (pi_0) is hashed here, once
    for key, d in dirs.items():
        if key not in fingerprints:
            fingerprints[key] = next((fingerprints[k] for k in fingerprints if dirs.get(k) == d), None) or fingerprint(d)
    s = Setup(cfg, dirs, fingerprints, tok, tok.pad_token_id if tok.pad_token_id is not None else 0,
              shared_vocab(dirs), pick_device(cfg.device))

    pairs = load_pairs(cfg, ctx.inputs.get("pairs"))
    kept = [(pair, c, r) for pair in pairs
            for c, r in [(encode(tok, pair["prompt"], pair[k], p.max_length) for k in ("chosen", "rejected"))]
            if c is not None and r is not None]
    if not kept:
        raise TsalignError(f"none of the {len(pairs)} pairs has an answer token within pdistill.max_length="
                           f"{p.max_length}; raise it")
    t0 = time.time()
    examples, caches = {}, {}
    if "dckd" in phases(p.loss):
        examples["dckd"], caches["pairs"] = dckd_examples(s, kept)
    if "adpa" in phases(p.loss):
        examples["adpa"], caches["greedy"] = adpa_examples(s, kept)
    teacher_s, t1 = time.time() - t0, time.time()
    model, trained = train(ctx, s, examples)

    with atomic_dir(ctx.directory / "policy") as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    counts = {"pairs": len(pairs), "pairs_used": len(kept), "pairs_dropped": len(pairs) - len(kept),
              **{f"{name}_cache": "reused" if c.reused else "built" for name, c in caches.items()},
              **{f"{name}_response_tokens": int(c.tensors["offsets"][-1]) for name, c in caches.items()},
              "teacher_calls": teacher_calls(caches), **overall(trained, phases(cfg.pdistill.loss)),
              **trained, "teacher_s": round(teacher_s, 2), "train_s": round(time.time() - t1, 2)}
    ctx.tracker.log({f"pdistill/{k}": v for k, v in counts.items() if isinstance(v, (int, float))})
    extra = {"device": s.device, **{f"{k}_dir": str(v) for k, v in dirs.items()},
             "teacher_caches": {name: str(c.directory) for name, c in caches.items()}}
    return StageResult(counts, {"policy": ctx.directory / "policy"}, extra)


STAGE = Stage("pdistill", plan, run, check)
