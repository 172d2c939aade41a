"""Teacher distributions, computed once per dataset and cached, so no teacher sits in memory while a student trains.

    seq = encode(tokenizer, prompt_messages, answer_messages, max_length)     -> Sequence(ids, start) | None
    cache = cached(root, identity, build, what)                               -> TeacherCache
    tensors = teacher_topk(model_dir, sequences, k, vocab, ...)              (inside `build`)
    tensors["ref_logp"] = reference_logp(ref_dir, sequences, tensors["ids"], ...)

A cache entry is the folder <root>/<config_hash(identity)>/, written atomically (tsalign.artifacts.store.atomic_dir),
its manifest last; `identity` holds everything the tensors depend on (the teacher's and the reference's
fingerprints, top_k, the token ids of every sequence or what determines them), so an entry is never stale:
another teacher or dataset is another folder. Files:

    sequences.json        [{"ids": [...], "start": P}]: prompt ids[:P], response ids[P:]
    teacher.safetensors   ids [N, k] int32, probs [N, k], rest [N] (the mass outside the top k), offsets [S + 1];
                          ref_logp [N, k] (the reference's log-probabilities on the same ids) when a reference ran
    manifest.json         identity, key, counts, build time

Row offsets[s] + j is the teacher's distribution over the response token ids[P + j] of sequence s, given
everything before it (top-k + remainder, as in the ADPA authors' released code; tsalign.algorithms.policy_losses).
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tsalign.artifacts.locks import build_once
from tsalign.artifacts.store import atomic_dir, atomic_write_json, config_hash, read_manifest
from tsalign.errors import TsalignError
from tsalign.progress import progress, say

TENSORS = "teacher.safetensors"
SEQUENCES = "sequences.json"


@dataclass(frozen=True)
class Sequence:
    ids: list[int]
    start: int  # first response token; the response is ids[start:]

    @property
    def response_tokens(self) -> int:
        return len(self.ids) - self.start


def chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"])


def encode(tokenizer, prompt: list[dict], answer: list[dict], max_length: int) -> Sequence | None:
    """prompt + answer under the chat template, tokenized as TRL does; a long prompt loses its start (never below
    max_length // 4 tokens), a long answer its end. None when no answer token fits."""
    from tsalign.algorithms.pairs import truncate_prompt_left

    p = chat_ids(tokenizer, prompt, add_generation_prompt=True)
    full = chat_ids(tokenizer, prompt + answer)
    if full[: len(p)] != p:
        raise TsalignError("the student's chat template does not extend the prompt's tokens with the answer's; "
                           "pdistill needs a template where prompt + assistant header is a prefix of the conversation")
    response = full[len(p):]
    budget = max(max_length - len(response), max_length // 4)
    if len(p) > budget:
        prompt = truncate_prompt_left(tokenizer, prompt, budget)
        p = chat_ids(tokenizer, prompt, add_generation_prompt=True)
        full = chat_ids(tokenizer, prompt + answer)
        response = full[len(p):] if full[: len(p)] == p else response
    ids = (p + response)[:max_length]
    return Sequence(ids, len(p)) if 0 < len(p) < len(ids) else None


def sequences_hash(sequences: list[Sequence]) -> str:
    return config_hash([[s.ids, s.start] for s in sequences])


def _batches(sequences: list[Sequence], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i].ids))  # little padding per batch
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


def _padded(sequences: list[Sequence], index: list[int], pad_id: int, device: str):
    import torch

    width = max(len(sequences[i].ids) for i in index)
    ids = torch.full((len(index), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(index), width), dtype=torch.long)
    for row, i in enumerate(index):
        n = len(sequences[i].ids)
        ids[row, :n] = torch.tensor(sequences[i].ids)
        mask[row, :n] = 1
    return ids.to(device), mask.to(device)


def _response_logits(logits, seq: Sequence, vocab: int):
    """The logits that predict seq's response tokens: positions start-1 .. len-2, the first `vocab` ids."""
    return logits[seq.start - 1: len(seq.ids) - 1, :vocab]


def release_device_memory() -> None:
    """Hand the memory of dropped models back to the device. torch's CUDA caching allocator keeps freed blocks
    reserved for this process, and a vLLM engine started next counts only the device's free memory: it refuses
    to start below gpu_memory_utilization ("Free memory on device ... is less than desired"). Call it after
    the last reference to a model is gone (emptying the cache while a model is alive returns nothing);
    a no-op until CUDA is initialised."""
    import torch

    gc.collect()  # a model caught in a reference cycle dies here
    torch.cuda.empty_cache()


def _with_model(model_dir: Path, dtype: str, device: str, work: Callable):
    """work(model) with the model at model_dir loaded for it alone: the model is dropped (this frame holds
    the only reference) and the device memory released before this returns."""
    from tsalign.engines.models import load_causal_lm

    model = load_causal_lm(model_dir, dtype, device)
    try:
        return work(model)
    finally:
        del model
        release_device_memory()


def teacher_topk(model_dir: Path, sequences: list[Sequence], k: int, vocab: int, batch_size: int, device: str,
                 dtype: str = "float32", pad_id: int = 0, what: str = "teacher") -> dict:
    """The teacher's top-k ids and probabilities, and the remainder, at every response token; the teacher
    is loaded here and freed before this returns."""
    import torch

    from tsalign.algorithms.policy_losses import compress_topk

    def run(model) -> list:
        parts: list = [None] * len(sequences)
        with torch.no_grad(), progress(len(sequences), f"{what} top-{k}", "seq") as bar:
            for index in _batches(sequences, batch_size):
                ids_in, mask = _padded(sequences, index, pad_id, device)
                logits = model(input_ids=ids_in, attention_mask=mask).logits
                for row, i in enumerate(index):
                    ids, probs, rest = compress_topk(_response_logits(logits[row], sequences[i], vocab), k)
                    parts[i] = (ids.to(torch.int32).cpu(), probs.float().cpu(), rest.float().cpu())
                bar.update(len(index))
        return parts

    parts = _with_model(model_dir, dtype, device, run)
    lengths = torch.tensor([0] + [s.response_tokens for s in sequences])
    return {"ids": torch.cat([p[0] for p in parts]), "probs": torch.cat([p[1] for p in parts]),
            "rest": torch.cat([p[2] for p in parts]), "offsets": lengths.cumsum(0)}


def reference_logp(model_dir: Path, sequences: list[Sequence], ids, offsets, vocab: int, batch_size: int, device: str,
                   dtype: str = "float32", pad_id: int = 0):
    """The reference's log-probabilities on the teacher's top-k ids [N, k] (loaded here, freed before returning)."""
    import torch

    out = torch.zeros(ids.shape, dtype=torch.float32)

    def run(model) -> None:
        with torch.no_grad(), progress(len(sequences), "reference log-probs", "seq") as bar:
            for index in _batches(sequences, batch_size):
                ids_in, mask = _padded(sequences, index, pad_id, device)
                logits = model(input_ids=ids_in, attention_mask=mask).logits
                for row, i in enumerate(index):
                    lo, hi = int(offsets[i]), int(offsets[i + 1])
                    logp = _response_logits(logits[row], sequences[i], vocab).float().log_softmax(-1)
                    out[lo:hi] = logp.gather(-1, ids[lo:hi].long().to(logp.device)).cpu()
                bar.update(len(index))

    _with_model(model_dir, dtype, device, run)
    return out


@dataclass
class TeacherCache:
    directory: Path
    sequences: list[Sequence]
    tensors: dict
    reused: bool  # found on disk, not computed by this run
    extra: dict  # what the builder stored beside the tensors (e.g. the greedy answers)

    def rows(self, s: int) -> dict:
        """Sequence s's teacher rows (views): ids, probs, rest and ref_logp when present."""
        lo, hi = int(self.tensors["offsets"][s]), int(self.tensors["offsets"][s + 1])
        return {k: v[lo:hi] for k, v in self.tensors.items() if k != "offsets"}


def _matches(folder: Path, identity: dict) -> bool:
    manifest = read_manifest(folder)
    return manifest is not None and manifest.get("identity") == json.loads(json.dumps(identity, default=str)) \
        and (folder / TENSORS).is_file() and (folder / SEQUENCES).is_file()


def cached(root: Path, identity: dict, build: Callable[[], tuple[list[Sequence], dict, dict]], what: str) -> TeacherCache:
    """The cache entry of `identity` under `root`, built by `build() -> (sequences, tensors, extra)` unless it
    exists (one builder across processes; the others wait and reuse)."""
    from safetensors.torch import load_file, save_file

    folder = Path(root).expanduser() / config_hash(identity)

    def write() -> bool:
        t0 = time.time()
        sequences, tensors, extra = build()
        with atomic_dir(folder) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / TENSORS))
            atomic_write_json(tmp / SEQUENCES, {"sequences": [[s.ids, s.start] for s in sequences], "extra": extra})
            k = tensors["ids"].shape[-1]
            counts = {"sequences": len(sequences), "response_tokens": int(tensors["ids"].shape[0]), "top_k": k,
                      "mean_topk_mass": round(float(tensors["probs"].sum(-1).mean()), 4) if len(tensors["ids"]) else None,
                      "reference": "ref_logp" in tensors}
            atomic_write_json(tmp / "manifest.json", {"what": what, "key": folder.name, "identity": identity,
                                                      "counts": counts, "build_s": round(time.time() - t0, 2),
                                                      "created_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
        return True

    built = build_once(folder, lambda: _matches(folder, identity), write, f"the {what} cache")
    try:
        tensors = load_file(str(folder / TENSORS))
        stored = json.loads((folder / SEQUENCES).read_text())
    except Exception as e:  # noqa: BLE001 -- a damaged entry: one line naming the folder to delete
        raise TsalignError(f"the {what} cache {folder} cannot be read ({type(e).__name__}); delete that folder and "
                           "rerun") from None
    sequences = [Sequence(ids, start) for ids, start in stored["sequences"]]
    if int(tensors["offsets"][-1]) != sum(s.response_tokens for s in sequences):
        raise TsalignError(f"the {what} cache {folder} does not match its sequences; delete that folder and rerun")
    say(f"[pdistill] {what} cache {'built' if built else 'reused'}: {folder} ({len(sequences)} sequences, "
          f"{int(tensors['offsets'][-1])} response tokens)")
    return TeacherCache(folder, sequences, tensors, reused=not built, extra=stored.get("extra") or {})
