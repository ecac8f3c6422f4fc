"""The leaderboard: every registered method trained and evaluated under one protocol per tier (`python -m
benchmarks.leaderboard --help`; docs/leaderboard.md). The registry of rows is `methods.py`, the tiers `tiers.py`."""

from benchmarks.leaderboard.methods import METHODS, Method, register, unregister
from benchmarks.leaderboard.run import main, run
from benchmarks.leaderboard.tiers import TIERS, Budget, Tier

__all__ = ["METHODS", "TIERS", "Budget", "Method", "Tier", "main", "register", "run", "unregister"]
