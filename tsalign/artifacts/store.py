"""The artifact contract: experiment layout, atomic writes, manifests, skip-if-done.

    outputs/<experiment>/iter_<t>/<stage>/   files of one stage + manifest.json (written last)

A stage directory without manifest.json is unfinished: its files are overwritten on the next run.
Every file is written to a temp name in the same directory, fsynced and renamed, so a crash leaves
either the old file or the new one, never half of one. A redo of a finished stage works in a staging
directory beside it and replaces the finished one only once it has finished itself. Finished outputs
are checked against their manifest (size and mtime, the content hash when those differ) before
anything trusts them. This module knows nothing of stages. What it writes is a persisted format
(FORMAT.md beside this file): finished experiments on users' disks are recognised as done by it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from tsalign.artifacts.format import hashed_config
from tsalign.errors import TsalignError

MANIFEST = "manifest.json"
_VERSIONED = ("tsalign-cli", "torch", "transformers", "trl", "accelerate", "peft", "datasets", "hydra-core", "vllm")


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
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    # os.open applies the umask to 0o666 as any file gets it (mkstemp would make 0600)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
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
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    tmp.mkdir(mode=0o777)  # the umask applies (mkdtemp would make 0700)
    try:
        yield tmp
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(new: Path, path: Path) -> None:
    """Move the finished folder `new` to `path`, replacing what is there only after `new` is complete."""
    if path.exists():
        old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:12]}")
        os.replace(path, old)
        os.replace(new, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, path)
    _fsync_dir(path.parent)


def utf8_text(data: bytes, path: Path, first_line: int = 1) -> str:
    """`data` (read from `path`, starting at `first_line`) as text; bytes that are not UTF-8 are a
    one-line error naming the file and line."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + data[: e.start].count(b"\n")
        raise TsalignError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save the file as UTF-8 "
                           "(e.g. `iconv -f latin1 -t utf-8`)") from None


def read_jsonl(path: str | Path, what: str = "file") -> list[dict]:
    """Read a JSONL file; a malformed line is a one-line error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise TsalignError(f"{what} not found: {path}")
    rows = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = utf8_text(raw, path, lineno)
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


def _recorded(path: Path) -> tuple[dict, str] | None:
    """(manifest, output name) when `path` is an output recorded in its folder's manifest."""
    manifest = read_manifest(path.parent)
    for name, rel in (manifest or {}).get("outputs", {}).items():
        if rel == path.name:
            return manifest, name
    return None


def verify_output(path: str | Path) -> Path:
    """`path` unchanged since its stage finished, else a one-line error naming the stage to redo.
    Size and mtime are compared first; only when they differ is the content re-hashed (a copy made
    without preserving mtimes is still fine)."""
    path = Path(path)
    found = _recorded(path)
    if found is None:
        return path
    manifest, name = found
    stat, sha = manifest.get("output_stat", {}).get(name), manifest.get("output_sha256", {}).get(name)
    if stat is None or sha is None or (path.exists() and stat_signature(path) == stat):
        return path
    if path.exists() and content_fingerprint(path, missing_ok=True) == sha:
        return path
    where = f"iter_{manifest.get('iteration')}/{manifest.get('stage')}"
    raise TsalignError(f"{path} was changed or damaged after {where} finished (it no longer matches that stage's "
                       f"manifest); rerun `tsalign stage={manifest.get('stage')} iteration={manifest.get('iteration')} "
                       "redo=true`")


def damaged_outputs(directory: str | Path, manifest: dict) -> list[str]:
    """The outputs of a finished stage that are gone or changed since its manifest was written, as
    `name (missing)` / `name (changed)`; cheap while they are intact (sizes and mtimes only)."""
    found = []
    for rel in manifest.get("outputs", {}).values():
        path = Path(directory) / rel
        if not path.exists():
            found.append(f"{rel} (missing)")
            continue
        try:
            verify_output(path)
        except TsalignError:
            found.append(f"{rel} (changed)")
    return found


def fingerprint(path: str | Path, cache: str | Path | None = None) -> str:
    """Content hash of an input. A finished stage's output is immutable and its manifest records its
    hash, so a multi-GB checkpoint is hashed once, when its stage finishes, not by every reader; it
    is verified (verify_output) before its recorded hash is trusted. Anything else (a base model in a package or
    the HF cache) is hashed once per machine cache (paths.cache) and trusted while its files' names, sizes and mtimes
    stay (remembered_fingerprint), as outputs are; without a cache, hashed every time."""
    path = Path(path)
    found = _recorded(path)
    if found and found[1] in found[0].get("output_sha256", {}):
        verify_output(path)
        return found[0]["output_sha256"][found[1]]
    return content_fingerprint(path) if cache is None else remembered_fingerprint(path, Path(cache) / "fingerprints")


def remembered_fingerprint(path: Path, memo: Path) -> str:
    """content_fingerprint(path), kept in memo/<digest of the path>.json with its stat_signature: a 16 GB base model
    is read once, not at every evaluate; a file changed since (another size or mtime) is hashed again."""
    path = path.resolve()
    note = memo / f"{config_hash(str(path))}.json"
    signature = stat_signature(path)
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        kept = json.loads(note.read_text())
        if kept["path"] == str(path) and kept["stat"] == signature:
            return kept["sha256"]
    sha = content_fingerprint(path)
    with contextlib.suppress(OSError):  # a read-only cache: hashed again next time, nothing lost
        atomic_write_json(note, {"path": str(path), "stat": signature, "sha256": sha})
    return sha


def _content_files(path: Path) -> list[Path]:
    """The files that define an output: the file itself, or a folder's files minus temp files,
    dotfiles and manifests."""
    if path.is_file():
        return [path]
    return [p for p in sorted(path.rglob("*")) if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(path).parts) and p.name != MANIFEST]


def stat_signature(path: str | Path) -> str:
    """Cheap identity of an output: names, sizes and modification times of its files."""
    path = Path(path)
    entries = [(str(p.relative_to(path)) if p != path else p.name, p.stat().st_size, p.stat().st_mtime_ns)
               for p in _content_files(path)]
    return config_hash(entries)


def content_fingerprint(path: str | Path, missing_ok: bool = False) -> str:
    """Content hash of a file, or of every file in a directory (names included; temp files, dotfiles
    and manifests, which hold timings, excluded)."""
    path = Path(path)
    h = hashlib.sha256()
    files = _content_files(path) if path.exists() else []
    if not files and not missing_ok:
        raise TsalignError(f"input not found: {path}")
    for p in files:
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
    """One stage of one iteration: decides skip / run, and writes the manifest last.

    A first run (or a resumed unfinished one) works in `directory` itself. A redo of a finished stage
    works in `staging` (iter_<t>/.<stage>.redo, kept across crashes so the redo resumes too) and is
    swapped in by `finish`: until then the finished outputs and their manifest stay valid."""

    directory: Path
    stage: str
    iteration: int
    config: dict  # the part of the config this stage's outputs depend on (recorded whole in the manifest)
    inputs: dict[str, Path] = field(default_factory=dict)
    redo: bool = False
    started: float = field(default_factory=time.time)
    work_dir: Path | None = None  # where the outputs are written: set by begin()
    _fingerprints: dict | None = field(default=None, repr=False)

    @property
    def manifest_path(self) -> Path:
        return self.directory / MANIFEST

    @property
    def staging(self) -> Path:
        return self.directory.with_name(f".{self.directory.name}.redo")

    @property
    def hashed(self) -> dict:
        """The config as hashed and compared: new keys at their default left out (tsalign.artifacts.format)."""
        return hashed_config(self.stage, self.config)

    def input_fingerprints(self) -> dict[str, dict]:
        """Taken once per run: is_done, the resume stamp and the manifest share them (a prompt file
        without a manifest would otherwise be hashed three times)."""
        if self._fingerprints is None:
            self._fingerprints = {name: {"path": str(p), "sha256": fingerprint(p)} for name, p in self.inputs.items()}
        return self._fingerprints

    def stamp(self) -> dict:
        """What resumable partial work (_work/) is valid for: this config and these exact inputs."""
        return {"config": self.hashed, "inputs": {k: v["sha256"] for k, v in self.input_fingerprints().items()}}

    def is_done(self) -> bool:
        """True when a matching manifest exists and its outputs are intact. Raises ConfigChanged when
        the config or inputs differ, TsalignError when an output was damaged after the stage finished."""
        if not self.manifest_path.is_file():
            return False
        old = json.loads(self.manifest_path.read_text())
        # both sides through the same view: a key added since (absent from the old manifest) counts only when
        # it is set off its default; the old config is kept whole, so a default changed since is a change too
        changed = _diff(hashed_config(self.stage, old.get("config", {})), self.hashed)
        old_inputs = {k: v["sha256"] for k, v in old.get("inputs", {}).items()}
        new_inputs = {k: v["sha256"] for k, v in self.input_fingerprints().items()}
        changed += [f"input:{k}" for k in sorted(set(old_inputs) | set(new_inputs)) if old_inputs.get(k) != new_inputs.get(k)]
        if self.redo:
            return False
        if not changed:
            for rel in old.get("outputs", {}).values():
                verify_output(self.directory / rel)
            return True
        shown = ", ".join(changed[:5]) + (" ..." if len(changed) > 5 else "")
        raise ConfigChanged(
            f"{self.directory} was made with a different config or inputs (changed: {shown}); "
            "add redo=true to replace it, or set another experiment_name"
        )

    def begin(self) -> Path:
        """Where this attempt writes: the stage dir, or the staging dir when a finished stage is redone."""
        self.work_dir = self.staging if self.manifest_path.is_file() else self.directory
        self.work_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            (self.work_dir / MANIFEST).unlink()
        self.started = time.time()
        return self.work_dir

    def finish(self, counts: dict, outputs: dict[str, str | Path], extra: dict | None = None) -> dict:
        work = self.work_dir or self.directory
        manifest = {
            "stage": self.stage,
            "iteration": self.iteration,
            "config_hash": config_hash(self.hashed),
            "config": self.config,
            "inputs": self.input_fingerprints(),
            "outputs": {k: str(Path(v).relative_to(work)) for k, v in outputs.items()},
            "output_sha256": {k: content_fingerprint(v) for k, v in outputs.items()},
            "output_stat": {k: stat_signature(v) for k, v in outputs.items()},
            "counts": counts,
            "versions": package_versions(),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.started)),
            "wall_time_s": round(time.time() - self.started, 2),
            "host": platform.node(),
            **(extra or {}),
        }
        shutil.rmtree(work / "_work", ignore_errors=True)  # resume state, no longer needed
        atomic_write_json(work / MANIFEST, manifest)
        if work != self.directory:
            replace_dir(work, self.directory)
        self.work_dir = self.directory
        return manifest


@contextlib.contextmanager
def stage_lock(directory: Path) -> Iterator[None]:
    """One writer per stage directory (the lock file sits beside it, so a redo can swap the directory);
    the lock dies with its process (kill -9 included)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.with_name(f".{directory.name}.lock"), "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TsalignError(f"another tsalign process is writing {directory}; wait for it or stop it") from None
        yield


LOOP_LOCK = ".loop.lock"  # in the experiment folder, held by a running stage=loop (its pid inside)


@contextlib.contextmanager
def loop_lock(experiment: Path) -> Iterator[None]:
    """One stage=loop per experiment, held between its stages too (when no stage lock is), so `tsalign stage=status`
    can say a loop is running and a second loop is refused at once, not at the stage the first one is in."""
    experiment.mkdir(parents=True, exist_ok=True)
    with open(experiment / LOOP_LOCK, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            pid = f.read().strip() or "?"
            raise TsalignError(f"another stage=loop (pid {pid}) is running {experiment}; wait for it "
                               "(`tsalign stage=status` shows where it is) or stop it") from None
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
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
