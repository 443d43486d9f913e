"""Errors a user can cause. Each message names the problem and what to do about it.

The CLI prints `str(err)` on one line and exits 2; anything else is a bug and keeps
its traceback.
"""


class FlashLMError(Exception):
    """Base class of every error caused by input (files, names, settings, prompts)."""


class ModelNotFoundError(FlashLMError):
    """A model path that does not exist, or a registry name nobody knows."""


class ModelFormatError(FlashLMError):
    """A file that is not a model file, or one that is truncated or corrupt."""


class UnsupportedModelError(FlashLMError):
    """A real model file using an architecture or tensor type flashlm does not run."""


class ModelFetchError(FlashLMError):
    """Fetching a registry model failed (network, pip, or a checksum mismatch)."""


class ContextLengthError(FlashLMError):
    """A prompt that does not fit in the context window."""


class InvalidArgumentError(FlashLMError):
    """A setting with a value out of range (sampling parameters, sizes, thread counts)."""


class ModelBusyError(FlashLMError):
    """A Model called from a thread whose own generation on it is still open."""
