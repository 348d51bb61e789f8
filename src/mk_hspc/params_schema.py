"""The parameters' schema and the error that names every key that breaks it."""

from __future__ import annotations

from collections.abc import Sequence


class ParameterError(ValueError):
    """Parameters that break the schema; the message lists every problem, each with its dotted key."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("Invalid parameters:\n" + "\n".join(f"  {problem}" for problem in self.problems))
