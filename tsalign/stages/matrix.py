"""TSO's model matrix: candidates from more than the current policy (our reading of arXiv 2409.02118's abstract).

    tsalign stage=generate generate.matrix=[initial] generate.matrix_candidates=2 generate.references=true

Each entry of `generate.matrix` samples `generate.matrix_candidates` more answers per prompt beside pi_t's K:
`initial` (pi_0; skipped at t = 0, where pi_t is pi_0), a conf/policy/ option name (a second model), or the
path of an HF checkpoint. `generate.references=true` adds the prompt's reference answer from the data
(data.reference_field: a human's or a stronger model's) as one more candidate. Every extra candidate is
tagged with its `source`, which rank's preference correction (rank.correction) reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from tsalign.algorithms.selection import REFERENCE
from tsalign.config.options import model_option, option_file, options
from tsalign.errors import TsalignError


@dataclass(frozen=True)
class MatrixModel:
    name: str  # the entry as configured; also names its resumable work file
    label: str  # what its candidates' `source` says
    directory: Path | None  # an HF checkpoint folder; None: resolve the policy option `spec` from the cache
    spec: DictConfig | None = None


def matrix_models(cfg: DictConfig, iteration: int) -> list[MatrixModel]:
    """The extra policies of generate.matrix, in order, without pi_t itself."""
    models = []
    for entry in cfg.generate.matrix:
        entry = str(entry)
        if entry == "initial":
            if iteration > 0:  # at t = 0 pi_t is pi_0: nothing new to add
                models.append(MatrixModel(entry, "pi_0", None, cfg.policy))
        elif option_file("policy", entry):
            spec = model_option("policy", entry)
            models.append(MatrixModel(entry, spec.name, None, spec))
        elif Path(entry).expanduser().is_dir():
            path = Path(entry).expanduser().resolve()
            models.append(MatrixModel(entry, path.name, path))
        else:
            raise TsalignError(f"generate.matrix entry '{entry}': use initial, a conf/policy option ({options('policy')}) "
                               "or the path of an HF checkpoint folder")
    return models


def model_dir(cfg: DictConfig, model: MatrixModel) -> Path:
    from tsalign.stages.lineage import base_model_dir

    return model.directory or base_model_dir(cfg, model.spec)


def add_candidates(rows: list[dict], extra: list[dict], source: str) -> None:
    """Append `extra`'s candidates (rows in the same prompt order) to `rows`', tagged with their source."""
    for row, more in zip(rows, extra, strict=True):
        row["candidates"] += [{**c, "source": source} for c in more["candidates"]]


def add_references(rows: list[dict], prompts: list[dict]) -> int:
    """The prompt's reference answer as one more candidate, where the data has one; returns how many."""
    added = 0
    for row, prompt in zip(rows, prompts, strict=True):
        if prompt.get("reference"):
            row["candidates"].append({"text": prompt["reference"], "finish_reason": "stop", "empty": False,
                                      "num_tokens": 0, "prompt_truncated": False, "source": REFERENCE})
            added += 1
    return added
