"""Typed errors. Every message says what went wrong and how to fix it."""
from __future__ import annotations


class CrispEdgeError(Exception):
    """Base class of every error crisp-edge raises on purpose."""


class ConfigError(CrispEdgeError, ValueError):
    """A configuration value is out of range or inconsistent with the model."""


class UnknownArchitectureError(CrispEdgeError, ValueError):
    """The model is not one of the registered architectures."""


class RetrofitError(CrispEdgeError, RuntimeError):
    """A retrofit method cannot be applied with the chosen settings."""


class CheckpointError(CrispEdgeError, ValueError):
    """A checkpoint is unreadable, truncated, or does not match its config."""


class DataError(CrispEdgeError, ValueError):
    """A dataset is missing or malformed."""


class MixerFileError(CrispEdgeError, ValueError):
    """A mixer file is unreadable or does not fit the model it is applied to."""


class CorruptMixerFileError(MixerFileError):
    """The file is truncated, damaged, or not a crisp-edge mixer file."""


class BasisMismatchError(MixerFileError):
    """The mixers were trained on other bases (fingerprints differ)."""


class LayoutMismatchError(MixerFileError):
    """The file's groups or tensor shapes differ from the model's layer layout."""


class GateMismatchError(MixerFileError):
    """The file was trained with another gate or gate placement."""


class DtypeMismatchError(MixerFileError):
    """The file's dtype does not match what it declares or what the model computes in."""
