"""User-facing errors: each carries one line that names the file and what was expected.

The CLI prints ``str(error)`` on one line and exits with status 1 for any ``MoraError``;
anything else is a bug and keeps its traceback.
"""


class MoraError(Exception):
    """Base class for errors caused by user input (files, options, data)."""


class BackboneError(MoraError):
    """A backbone could not be created or its weights could not be loaded."""


class AdapterError(MoraError):
    """An adapter does not fit the model, or an adapter folder is missing/corrupt."""


class DataError(MoraError):
    """A dataset root, annotation file or image is missing or malformed."""


class IndexFolderError(MoraError):
    """A retrieval index folder is missing, damaged or built with another model."""


class DeviceError(MoraError):
    """The requested device or precision does not exist on this machine."""


class TrainingError(MoraError):
    """Training cannot continue (non-finite loss, incompatible checkpoint, ...)."""
