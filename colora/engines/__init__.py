"""Engines run an algorithm's client tasks and own the round loop and the run directory."""

from .inprocess import InProcessEngine, run_experiment

__all__ = ["InProcessEngine", "run_experiment"]
