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


class DamagedCheckpointError(CorruptFileError):
    """A converted checkpoint (nvfp4ckpt's own output, recognised by its descriptor) is damaged: a file, rank folder
    or tensor missing, a shard truncated or corrupt, the manifest missing or wrong. A failed check, not bad usage:
    exit 1 wherever it is found (verify, revert's structure check, reading it mid-run)."""

    exit_code = EXIT_CHECK_FAILED


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


class InterruptedRun(KeyboardInterrupt):
    """Ctrl-C or SIGTERM while writing: names the partial folder kept for ``--resume``."""

    def __init__(self, partial: str, size: int, shards: int) -> None:
        super().__init__(partial)
        self.partial, self.size, self.shards = partial, size, shards


class Interrupted(Nvfp4CkptError):
    """The CLI's form of ``InterruptedRun``: the one-line message, exit code 130 as for any Ctrl-C."""

    exit_code = 130


class HubError(InputError):
    """A Hugging Face Hub repo id could not be downloaded."""


class MissingExtraError(Nvfp4CkptError):
    """The command needs a package that the installed extras leave out (the small install has no torch)."""


class CheckFailedError(Nvfp4CkptError):
    """A verification check ran and failed."""

    exit_code = EXIT_CHECK_FAILED


class UnknownTensorError(InputError):
    """A tensor name is not an expert tensor of any MoE layer the layout descriptor lists."""


class DuplicateTensorError(InputError):
    """Two names in one update for the same expert tensor (``experts.1`` and ``experts.01``, ``w1`` and ``gate_proj``)."""


class AliasedTensorError(BadTensorError):
    """Live tensors that share memory with each other, or a source that shares memory with a live tensor."""


class StaleScalarError(InputError):
    """An in-place update would leave a dependent scalar (g1_alphas, a1/a2, ...) inconsistent with the weights."""


class LiveMismatchError(CheckFailedError):
    """Live kernel-layout tensors differ from the kernel layout of the given source tensors."""


class EngineRefusalError(InputError):
    """A serving engine's plugin cannot serve the converted checkpoint exactly as configured (one-line reason)."""


class UnsafePathError(OutputExistsError):
    """A path nvfp4ckpt creates next to DST (lock, partial folder, aside folder) is a symlink or not a plain
    file/folder: someone else put it there, and following it could write outside DST."""


class BadFieldError(InputError):
    """A JSON field the tool reads (config, index, header, descriptor) has the wrong type or value."""
