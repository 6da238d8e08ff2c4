"""Deduplication over staging: blocking -> pairwise comparison -> scoring -> guarded clustering ->
survivorship -> golden records with lineage."""

from crmbridge.dedupe.matcher import Matcher, MatchResult

__all__ = ["MatchResult", "Matcher"]
