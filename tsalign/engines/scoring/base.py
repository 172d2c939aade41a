"""The Scorer protocol: for each prompt, a score per candidate response (higher is better)."""

from __future__ import annotations

from typing import Protocol


class Scorer(Protocol):
    stats: dict  # calls (responses scored or comparisons asked), truncated, seconds

    def score_groups(self, prompts: list[list[dict]], groups: list[list[str]]) -> list[list[float]]: ...

    def close(self) -> None: ...
