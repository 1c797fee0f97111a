"""The project's one error type for bad input.

Every user-facing failure (a recipe key, a missing file, a corrupt header, a
shape that disagrees with the model) is raised as :class:`MixedError`, whose
message names the culprit and says how to fix it. The CLI turns it into exit
status 2 without a traceback; inside vLLM it surfaces as a ``ValueError`` so
the engine start fails with the same text.
"""

from __future__ import annotations

__all__ = ["MixedError"]


class MixedError(ValueError):
    """Bad input: the message names the file, tensor, layer, rule or key at
    fault and how to fix it."""

    exit_code = 2
