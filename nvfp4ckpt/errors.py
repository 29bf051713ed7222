"""Semantic errors. Each message is one line that names the file/tensor and says what to do.

The CLI maps every ``Nvfp4CkptError`` to its ``exit_code`` and prints the message; anything
else is a bug and gets a traceback (with ``NVFP4CKPT_DEBUG=1``).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2


class Nvfp4CkptError(Exception):
    """Base class: a problem the user can act on."""

    exit_code = EXIT_USAGE


class InputError(Nvfp4CkptError):
    """The source checkpoint cannot be used as given."""


class NotNvfp4Error(InputError):
    """The checkpoint is not ModelOpt NVFP4 or compressed-tensors nvfp4-pack-quantized."""


class UnsupportedArchitectureError(InputError):
    """No architecture adapter is registered for the model type."""


class NoMoELayersError(InputError):
    """The checkpoint has no quantized MoE expert tensors."""


class MissingTensorError(InputError):
    """An expert weight or scale the layout needs is absent."""


class BadTensorError(InputError):
    """A tensor has the wrong dtype or shape."""


class CorruptFileError(InputError):
    """A safetensors file or index is unreadable, truncated or inconsistent."""


class AlreadyConvertedError(InputError):
    """The source already carries the nvfp4ckpt layout descriptor."""


class OutputExistsError(Nvfp4CkptError):
    """The destination exists and is not empty."""


class SourceChangedError(InputError):
    """A source file changed (size, mtime or inode) while it was being converted."""


class OutputWriteError(Nvfp4CkptError):
    """Writing the destination failed for a reason outside the input (disk full, interrupted run)."""


class DiskFullError(OutputWriteError):
    """The destination's file system ran out of space (or quota) while writing."""


class ResumeMismatchError(OutputWriteError):
    """``--resume`` found a partial folder written from other source files or options."""


class HubError(InputError):
    """A Hugging Face Hub repo id could not be downloaded."""


class MissingExtraError(Nvfp4CkptError):
    """The command needs a package that the installed extras leave out (the small install has no torch)."""
