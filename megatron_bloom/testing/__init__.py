"""Helpers for tests that need several ranks."""
from .multiprocess import RankFailure, run_distributed

__all__ = ["RankFailure", "run_distributed"]
