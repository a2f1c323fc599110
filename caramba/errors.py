"""Every error caramba raises on purpose: one hierarchy, each message says what is wrong and what to do."""
from __future__ import annotations


class CarambaError(Exception):
    """Base class; catch this to handle any caramba failure."""


class CaptureError(CarambaError):
    """The model could not be traced into a graph (torch.export failed)."""


class UnsupportedOpError(CarambaError):
    """The traced graph holds an op with no importer or no reference implementation."""


class VerificationError(CarambaError):
    """The IR violates an invariant (types, shapes, use-def links)."""


class ParseError(CarambaError):
    """The IR text could not be parsed."""


class InputError(CarambaError, ValueError):
    """A compiled model was called with inputs of the wrong rank, dtype or size."""
