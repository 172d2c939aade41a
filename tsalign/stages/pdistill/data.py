"""pdistill's training rows: the pairs, tokenized by the student's tokenizer (which teacher and reference must
share), and the teacher's distributions on them (tsalign.stages.pdistill.teacher_cache).

    s = prepare(ctx)                              the declared models, tokenizers checked before any model loads
    kept = encode_pairs(s.tok, load_pairs(...))   (pair, chosen, rejected) sequences that fit max_length
    rows, cache = dckd_examples(s, kept)          teacher on chosen + rejected
    rows, cache = adpa_examples(s, kept)          the student's greedy answers, teacher + reference on them
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from tsalign.artifacts.store import config_hash, fingerprint
from tsalign.errors import TsalignError
from tsalign.stages.contract import StageContext
from tsalign.stages.pdistill import answers
from tsalign.stages.pdistill.sources import declared_models
from tsalign.stages.pdistill.teacher_cache import (
    Sequence,
    cached,
    encode,
    reference_logp,
    release_device_memory,
    sequences_hash,
    teacher_topk,
)


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


def encode_pairs(tok, pairs: list[dict], max_length: int) -> list[tuple[dict, Sequence, Sequence]]:
    """(pair, chosen, rejected) of every pair whose two answers keep a token within max_length."""
    kept = [(pair, c, r) for pair in pairs
            for c, r in [(encode(tok, pair["prompt"], pair[k], max_length) for k in ("chosen", "rejected"))]
            if c is not None and r is not None]
    if not kept:
        raise TsalignError(f"none of the {len(pairs)} pairs has an answer token within pdistill.max_length="
                           f"{max_length}; raise it")
    return kept


def prompt_key(pair: dict) -> str:
    return json.dumps(pair["prompt"], sort_keys=True, ensure_ascii=False)


@dataclass(frozen=True)
class Example:
    """One training row: the pair's chosen answer (CE; DCKD: KL) and a second sequence with teacher rows
    (DCKD: the rejected answer; ADPA: the student's greedy answer, with the reference's log-probs)."""

    chosen: Sequence
    chosen_rows: dict | None
    other: Sequence
    other_rows: dict


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


def prepare(ctx: StageContext) -> Setup:
    """The models plan declared, their tokenizers checked against the student's before any model loads, and
    their fingerprints (the cache identities): the runner hashed the inputs; the base policy (pi_0) is hashed
    here, once."""
    from tsalign.engines.models import load_tokenizer, pick_device

    dirs = declared_models(ctx)
    check_tokenizers(dirs)
    tok = load_tokenizer(dirs["student"], chat=True)
    fingerprints = dict(ctx.stamp["inputs"])
    for key, d in dirs.items():
        if key not in fingerprints:
            fingerprints[key] = next((fingerprints[k] for k in fingerprints if dirs.get(k) == d), None) or fingerprint(d)
    return Setup(ctx.cfg, dirs, fingerprints, tok, tok.pad_token_id if tok.pad_token_id is not None else 0,
                 shared_vocab(dirs), pick_device(ctx.cfg.device))


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
        said = answers.greedy_answers(cfg, s.dirs["student"], [m for _, m in prompts])
        encoded = [(key, encode(s.tok, m, [{"role": "assistant", "content": a}], p.max_length))
                   for (key, m), a in zip(prompts, said)]
        seqs = [q for _, q in encoded if q is not None]
        tensors = teacher_topk(s.dirs["teacher_policy"], seqs, **s.teacher_kw())
        tensors["ref_logp"] = reference_logp(s.dirs["teacher_reference"], seqs, tensors["ids"], tensors["offsets"],
                                             s.vocab, p.teacher_batch_size, s.device, cfg.policy.dtype, s.pad_id)
        return seqs, tensors, {"prompt_keys": [k for k, q in encoded if q is not None], "answers": said}

    identity = s.identity("greedy", "teacher_policy", "teacher_reference", "student",
                          prompts=config_hash([k for k, _ in prompts]), max_length=p.max_length,
                          greedy={**answers.greedy_params(cfg).as_dict(), "backend": str(cfg.sampler.backend)})
    cache = cached(s.root, identity, build, "teacher + reference (greedy answers)")
    where = {k: i for i, k in enumerate(cache.extra["prompt_keys"])}
    index = [(c, where.get(prompt_key(pair))) for pair, c, _ in kept]
    return [Example(c, None, cache.sequences[i], cache.rows(i)) for c, i in index if i is not None], cache
