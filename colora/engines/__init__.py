"""Engines build the model and run an algorithm's client work; ``colora.experiment`` owns the round
loop and the run directory."""

from .inprocess import InProcessEngine

__all__ = ["InProcessEngine"]
