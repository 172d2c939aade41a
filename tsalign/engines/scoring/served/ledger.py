"""The verdict ledger: every answer a served teacher gave, appended as it arrives, so that a crash, a
rerun or another experiment on the same candidates never pays for the same verdict twice.

    ledger = VerdictLedger.open(cache_dir, identity)      # <cache>/served/<hash of identity>.jsonl
    key = item_key(prompt_messages, "first answer", "second answer")
    ledger.get(key) -> dict | None;  ledger.add(key, {"p_first": 0.7, "tokens_in": 120, ...})

One JSONL file per teacher identity (api, base URL, model, template, temperature, max tokens... never
the API key), beside `<hash>.identity.json` saying what it is. Each line is written with one write
under an exclusive lock, flushed and fsynced; a torn last line (a kill mid-write) is cut off when the
file is next opened. Delete the file to ask the teacher again.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from pathlib import Path

from tsalign.artifacts.store import atomic_write_json, config_hash


def item_key(*parts) -> str:
    """A stable key for one question (prompt messages + candidate texts, in order)."""
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False, sort_keys=True).encode("utf-8")).hexdigest()


@contextlib.contextmanager
def _locked(path: Path):
    with path.open("a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield f
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def read_rows(path: Path) -> dict[str, dict]:
    """{key: answer} of a ledger file; a torn tail is cut off (under the lock) so appends stay readable."""
    rows: dict[str, dict] = {}
    if not path.is_file():
        return rows
    with _locked(path) as f:
        f.seek(0)
        data = f.read()
        whole = data[: data.rfind(b"\n") + 1]
        for line in whole.splitlines():
            try:
                row = json.loads(line)
                rows[row["key"]] = row["answer"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                continue  # a line torn by a kill and glued to the next one: that answer is asked again
        if len(whole) < len(data):  # a torn last line: cut it off so that appends stay readable
            f.truncate(len(whole))
            os.fsync(f.fileno())
    return rows


class VerdictLedger:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows = read_rows(self.path)

    @classmethod
    def open(cls, cache_dir: str | Path, identity: dict) -> VerdictLedger:
        name = config_hash(identity)[:16]
        folder = Path(cache_dir).expanduser() / "served"
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / f"{name}.identity.json").is_file():
            atomic_write_json(folder / f"{name}.identity.json", identity)  # what the file is, for a human
        return cls(folder / f"{name}.jsonl")

    def get(self, key: str) -> dict | None:
        return self.rows.get(key)

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, key: str, answer: dict) -> None:
        line = (json.dumps({"key": key, "answer": answer}, ensure_ascii=False) + "\n").encode("utf-8")
        with _locked(self.path) as f:
            end = f.seek(0, os.SEEK_END)
            if end:
                f.seek(end - 1)
                if f.read(1) != b"\n":
                    line = b"\n" + line  # another process was killed mid-line: keep ours whole
            f.write(line)  # one write of a whole line: O_APPEND keeps lines of other processes whole
            f.flush()
            os.fsync(f.fileno())
        self.rows[key] = answer
