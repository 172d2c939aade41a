"""Scorers: a reward model (sequence classifier, one output) or an LLM judge, behind one protocol."""

from tsalign.scoring.base import Scorer, make_scorer

__all__ = ["Scorer", "make_scorer"]
