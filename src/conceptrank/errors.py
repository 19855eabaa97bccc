"""The exception types that mean bad user input (printed by the CLI as one clear line)."""

from __future__ import annotations

__all__ = ["ConceptrankError", "user_error_types"]


class ConceptrankError(ValueError):
    """Base class for conceptrank's own input errors."""


def user_error_types() -> tuple[type[BaseException], ...]:
    from .data.broden import BrodenError
    from .hooks import UnknownLayerError
    from .models import ModelError
    from .tally import TallyError

    types: list[type[BaseException]] = [ConceptrankError, BrodenError, UnknownLayerError, ModelError, TallyError, FileNotFoundError]
    return tuple(types)
