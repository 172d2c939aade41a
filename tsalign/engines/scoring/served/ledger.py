"""The verdict ledger: every answer a served teacher gave, appended as it arrives, so that a crash, a
rerun or another experiment on the same candidates never pays for the same verdict twice.

    ledger = VerdictLedger.open(cache_dir, identity)      # <cache>/served/<hash of identity>.jsonl
    key = item_key(prompt_messages, "first answer", "second answer")
    ledger.get(key) -> dict | None;  ledger.add(key, {"p_first": 0.7, "tokens_in": 120, ...})

One JSONL file per teacher identity (api, base URL, model, template, temperature, max tokens... never
the API key), beside `<hash>.identity.json` saying what it is. Each line is written with one write
under an exclusive lock, flushed and fsynced; a torn last line (a kill mid-write) is cut off when the
file is next opened. Delete the file to ask the teacher again.

A garbage answer (no choice named, not JSON, the wrong number of rewards) is kept apart, never as a
final answer: `add_garbage(key, why)` writes `{"key", "garbage"}`, `get` does not return it, and the
question is asked again on the next run (a server fixed later answers it; `was_garbage` counts these).
A final answer is never displaced by a garbage one. Rows of ledgers written before this kept "no choice"
answers as `{"p_first": null, "why": ...}`: they are read as garbage too.
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


def garbage_of(row: dict) -> str | None:
    """Why a ledger row is no final answer (None: it is one); an old kept "no choice" row counts as garbage."""
    if "garbage" in row:
        return str(row["garbage"])
    answer = row["answer"]
    return str(answer["why"]) if isinstance(answer, dict) and answer.get("why") else None


def read_rows(path: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """({key: final answer}, {key: why its last answer was garbage}) of a ledger file; a torn tail is cut
    off (under the lock) so appends stay readable."""
    rows: dict[str, dict] = {}
    garbage: dict[str, str] = {}
    if not path.is_file():
        return rows, garbage
    with _locked(path) as f:
        f.seek(0)
        data = f.read()
        whole = data[: data.rfind(b"\n") + 1]
        for line in whole.splitlines():
            try:
                row = json.loads(line)
                key, why = row["key"], garbage_of(row)
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                continue  # a line torn by a kill and glued to the next one: that answer is asked again
            if why is None:
                rows[key] = row["answer"]
                garbage.pop(key, None)
            elif key not in rows:  # two processes asked at once: the final answer wins, in any order
                garbage[key] = why
        if len(whole) < len(data):  # a torn last line: cut it off so that appends stay readable
            f.truncate(len(whole))
            os.fsync(f.fileno())
    return rows, garbage


class VerdictLedger:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows, self.garbage = read_rows(self.path)

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

    def was_garbage(self, key: str) -> bool:
        """Whether this question was asked before and answered garbage only (it is asked again)."""
        return key in self.garbage

    def add(self, key: str, answer: dict) -> None:
        """A final answer: read back instead of asking again."""
        self._append({"key": key, "answer": answer})
        self.rows[key] = answer
        self.garbage.pop(key, None)

    def add_garbage(self, key: str, why: str) -> None:
        """A garbage answer, kept apart for a human and for the count: asked again next time."""
        self._append({"key": key, "garbage": why})
        if key not in self.rows:
            self.garbage[key] = why

    def _append(self, row: dict) -> None:
        line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        with _locked(self.path) as f:
            end = f.seek(0, os.SEEK_END)
            if end:
                f.seek(end - 1)
                if f.read(1) != b"\n":
                    line = b"\n" + line  # another process was killed mid-line: keep ours whole
            f.write(line)  # one write of a whole line: O_APPEND keeps lines of other processes whole
            f.flush()
            os.fsync(f.fileno())
