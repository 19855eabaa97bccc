"""Every exception type of conceptrank.

Each one means bad input, environment or configuration and derives from :class:`ConceptrankError`,
which the CLI prints as one line (exit code 2). Anything else is a bug and keeps its traceback.
This module imports nothing of conceptrank's, so every layer may use it.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "ConceptrankError",
    "BrodenError",
    "TargetError",
    "ImageDecodeError",
    "TallyError",
    "ModelError",
    "UnknownLayerError",
    "DownloadError",
    "StaleInputError",
    "KnowledgeGraphError",
    "ConfigError",
    "RunFolderError",
    "OutputError",
    "DiskSpaceError",
    "FolderBusyError",
    "RulesError",
    "user_error_types",
]


class ConceptrankError(ValueError):
    """Base class for conceptrank's own input errors."""


class BrodenError(ConceptrankError):
    """A probe set that does not follow the Broden format; the message names the file and row."""


class TargetError(ConceptrankError):
    """A target set that cannot be indexed; the message names the file (and line) at fault."""


class TallyError(ConceptrankError):
    """A tally.csv that cannot be read; the message names the file and line."""


class KnowledgeGraphError(ConceptrankError):
    """A knowledge-graph file (ConceptNet, KGTK, WordNet) that cannot be read; the message names the file."""


class ModelError(ConceptrankError):
    """A model or weights specification that cannot be loaded; the message says what to do."""


class UnknownLayerError(ConceptrankError, KeyError):
    """A layer name that the model does not have; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class ImageDecodeError(ConceptrankError):
    """An image that cannot be used.

    Attributes
    ----------
    path : str
        The file.
    reason : str
        Short, stable reason (one of ``conceptrank.io.images.REASONS``), written to ``skipped.csv``.
    detail : str
        The underlying message (PIL's or the OS's), for humans.
    """

    def __init__(self, path: str | os.PathLike, reason: str, detail: str = "") -> None:
        self.path = str(path)
        self.reason = reason
        self.detail = detail
        super().__init__(f"cannot use image {self.path}: {reason}" + (f" ({detail})" if detail else ""))

    def __reduce__(self):  # picklable across DataLoader worker processes
        return (type(self), (self.path, self.reason, self.detail))


class DownloadError(ConceptrankError):
    """A download failed for a network reason (no route, refused, timeout, HTTP error, cut short).

    Attributes
    ----------
    url : str
        The address that was requested.
    reason : str
        Why it failed, in words.
    dest : Path
        Where the archive was to be stored.
    """

    def __init__(self, message: str, *, url: str, reason: str, dest: Path):
        super().__init__(message)
        self.url = url
        self.reason = reason
        self.dest = dest


class StaleInputError(ConceptrankError):
    """A stage's input is not the file its upstream manifest recorded (a re-run stage changed it).

    Attributes
    ----------
    path : the input file found now.
    manifest : the manifest that recorded a different SHA-256 for it.
    """

    def __init__(self, message: str, *, path: Path, manifest: Path):
        super().__init__(message)
        self.path = Path(path)
        self.manifest = Path(manifest)

    def __reduce__(self):
        return (_stale_input_error, (str(self), str(self.path), str(self.manifest)))


def _stale_input_error(message: str, path: str, manifest: str) -> "StaleInputError":
    return StaleInputError(message, path=Path(path), manifest=Path(manifest))


class ConfigError(ConceptrankError):
    """A run configuration (TOML file, option, environment variable) with a missing, unknown or
    wrongly typed field; the message names the file and field (or the option)."""


class RunFolderError(ConceptrankError):
    """A run folder that is incomplete or not a run folder at all; the message says what is missing."""


class OutputError(ConceptrankError):
    """An output that cannot be written (read-only folder, no permission, disk full mid-write).

    Attributes
    ----------
    path : str
        The file or folder that could not be written.
    """

    def __init__(self, message: str, path: str | os.PathLike = "") -> None:
        super().__init__(message)
        self.path = str(path)


class DiskSpaceError(OutputError):
    """Not enough free space for what a stage is about to write; the message says how much and where."""


class FolderBusyError(ConceptrankError):
    """Another conceptrank process is writing the same output folder (it holds the folder's lock)."""


class RulesError(ConceptrankError):
    """Inputs from which class rules cannot be learned (missing thresholds, no images, bad options)."""


def user_error_types() -> tuple[type[BaseException], ...]:
    """The exception types that mean bad user input (printed by the CLI as one clear line)."""
    return (ConceptrankError,)
