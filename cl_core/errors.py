"""Errors the pipeline maps to a config field without reading their text."""

from __future__ import annotations


class HyperparameterError(ValueError):
    """A constructor argument out of range: ``name`` the argument (a method's
    hyperparameter, as in ``params.<method>.<name>``), ``problem`` what is wrong with it.
    Reads ``"temperature: must be a finite number > 0, got 0"``."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"{name}: {problem}")
        self.name, self.problem = name, problem
