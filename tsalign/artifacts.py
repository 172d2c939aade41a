"""The artifact contract: experiment layout, atomic writes, manifests, skip-if-done.

    outputs/<experiment>/iter_<t>/<stage>/   files of one stage + manifest.json (written last)

A stage directory without manifest.json is unfinished: its files are overwritten on the next run.
Every file is written to a temp name in the same directory, fsynced and renamed, so a crash leaves
either the old file or the new one, never half of one. This module knows nothing of stages.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Iterator

from tsalign.errors import TsalignError

MANIFEST = "manifest.json"
_VERSIONED = ("tsalign", "torch", "transformers", "trl", "accelerate", "peft", "datasets", "hydra-core", "vllm")


_UMASK = os.umask(0)
os.umask(_UMASK)


class ConfigChanged(TsalignError):
    pass


def stage_dir(experiment_dir: str | Path, iteration: int, stage: str) -> Path:
    return Path(experiment_dir) / f"iter_{iteration}" / stage


# ---------------------------------------------------------------- atomic writes


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600: artifacts are shared like any file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def atomic_write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temp dir beside `path`; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_UMASK)
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:12]}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_jsonl(path: str | Path, what: str = "file") -> list[dict]:
    """Read a JSONL file; a malformed line is a one-line error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise TsalignError(f"{what} not found: {path}")
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TsalignError(f"{path}:{lineno}: malformed JSON ({e.msg}); fix or delete that line") from None
            if not isinstance(row, dict):
                raise TsalignError(f"{path}:{lineno}: expected a JSON object per line")
            rows.append(row)
    return rows


# ---------------------------------------------------------------- fingerprints


def config_hash(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def fingerprint(path: str | Path) -> str:
    """Content hash of an input. A finished stage's output is immutable and its manifest records its
    hash, so a multi-GB checkpoint is hashed once, when its stage finishes, not by every reader."""
    path = Path(path)
    manifest = path.parent / MANIFEST
    if manifest.is_file():
        recorded = json.loads(manifest.read_text())
        for name, rel in recorded.get("outputs", {}).items():
            if rel == path.name and name in recorded.get("output_sha256", {}):
                return recorded["output_sha256"][name]
    return content_fingerprint(path)


def content_fingerprint(path: str | Path) -> str:
    """Content hash of a file, or of every file in a directory (names included)."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    if not files:
        raise TsalignError(f"input not found: {path}")
    for p in files:
        if p != path and (p.name.startswith(".") or p.name == MANIFEST):
            continue  # temp files and manifests (timings) do not define content
        h.update(str(p.relative_to(path) if p != path else p.name).encode())
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _VERSIONED:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


# ---------------------------------------------------------------- stage runs


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [d for k in keys for d in _diff(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".")]


@dataclass
class StageRun:
    """One stage of one iteration: decides skip / run, and writes the manifest last."""

    directory: Path
    stage: str
    iteration: int
    config: dict  # the part of the config this stage's outputs depend on
    inputs: dict[str, Path] = field(default_factory=dict)
    redo: bool = False
    started: float = field(default_factory=time.time)

    @property
    def manifest_path(self) -> Path:
        return self.directory / MANIFEST

    def input_fingerprints(self) -> dict[str, dict]:
        return {name: {"path": str(p), "sha256": fingerprint(p)} for name, p in self.inputs.items()}

    def is_done(self) -> bool:
        """True when a matching manifest exists. Raises ConfigChanged when it does not match."""
        if not self.manifest_path.is_file():
            return False
        old = json.loads(self.manifest_path.read_text())
        changed = _diff(old.get("config", {}), self.config)
        old_inputs = {k: v["sha256"] for k, v in old.get("inputs", {}).items()}
        new_inputs = {k: v["sha256"] for k, v in self.input_fingerprints().items()}
        changed += [f"input:{k}" for k in sorted(set(old_inputs) | set(new_inputs)) if old_inputs.get(k) != new_inputs.get(k)]
        if self.redo:
            return False
        if not changed:
            return True
        shown = ", ".join(changed[:5]) + (" ..." if len(changed) > 5 else "")
        raise ConfigChanged(
            f"{self.directory} was made with a different config or inputs (changed: {shown}); "
            "add redo=true to replace it, or set another experiment_name"
        )

    def begin(self) -> None:
        """Called before work starts: a stale manifest (redo) goes first, so a crash cannot leave it."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.manifest_path.unlink()
        self.started = time.time()

    def finish(self, counts: dict, outputs: dict[str, str | Path], extra: dict | None = None) -> dict:
        manifest = {
            "stage": self.stage,
            "iteration": self.iteration,
            "config_hash": config_hash(self.config),
            "config": self.config,
            "inputs": self.input_fingerprints(),
            "outputs": {k: str(Path(v).relative_to(self.directory)) for k, v in outputs.items()},
            "output_sha256": {k: content_fingerprint(v) for k, v in outputs.items()},
            "counts": counts,
            "versions": package_versions(),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.started)),
            "wall_time_s": round(time.time() - self.started, 2),
            "host": platform.node(),
            **(extra or {}),
        }
        atomic_write_json(self.manifest_path, manifest)
        return manifest


@contextlib.contextmanager
def stage_lock(directory: Path) -> Iterator[None]:
    """One writer per stage directory; the lock dies with its process (kill -9 included)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TsalignError(f"another tsalign process is writing {directory}; wait for it or stop it") from None
        yield


def read_manifest(directory: Path) -> dict | None:
    p = Path(directory) / MANIFEST
    return json.loads(p.read_text()) if p.is_file() else None


class PartialRows:
    """Append-only JSONL of finished work inside an unfinished stage (`_work/`), so a crash loses at
    most the chunk in flight. Bound to a config hash: rows made under another config are discarded."""

    def __init__(self, path: Path, key: str, config: dict):
        self.path, self.key = Path(path), key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        stamp = self.path.with_suffix(".config")
        h = config_hash(config)
        if not stamp.is_file() or stamp.read_text() != h:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            atomic_write_text(stamp, h)
        self.rows: dict[str, dict] = {}
        if self.path.is_file():
            data, good = self.path.read_bytes(), 0
            for line in data.splitlines(keepends=True):
                try:
                    row = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    break  # a line cut by a crash: everything after it is redone
                if not line.endswith(b"\n"):
                    break  # complete JSON but no newline: appending would glue the next row onto it
                self.rows[row[key]] = row
                good += len(line)
            if good < len(data):  # cut the torn tail off so that rows appended later can be read back
                with self.path.open("r+b") as f:
                    f.truncate(good)
                    os.fsync(f.fileno())

    def __contains__(self, key: str) -> bool:
        return key in self.rows

    def extend(self, rows: list[dict]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            f.flush()
            os.fsync(f.fileno())
        self.rows.update({r[self.key]: r for r in rows})
