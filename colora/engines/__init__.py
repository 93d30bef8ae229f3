"""Engines build the model and run an algorithm's client work; ``colora.experiment`` owns the round
loop and the run directory."""

from .engine import Engine

InProcessEngine = Engine  # the name before engine.kind chose the executor (tests and scripts use it)

__all__ = ["Engine", "InProcessEngine"]
