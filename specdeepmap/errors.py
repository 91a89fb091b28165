"""One error family for the whole library.

Every leaf is also a built-in exception, so callers can catch either ``SpecDeepMapError`` or the
built-in they already expect (``ValueError``, ``FileNotFoundError``...). Messages name the file,
what was expected, what was found and how to fix it.
"""


class SpecDeepMapError(Exception):
    """Base class of every error this library raises on purpose."""


class InvalidParameterError(SpecDeepMapError, ValueError):
    """A parameter is out of range or inconsistent with another one."""


class InputMismatchError(SpecDeepMapError, ValueError):
    """Two inputs that must agree (grid, CRS, band count, classes...) do not."""


class InvalidLabelError(SpecDeepMapError, ValueError):
    """A label raster holds values that are not class values 0-255."""


class EmptyDatasetError(SpecDeepMapError, ValueError):
    """A folder or CSV that should list chips lists none (or none with labels)."""


class SplitInfeasibleError(SpecDeepMapError, ValueError):
    """No train/validation/test split satisfies the minimum class share rule."""


class MissingInputError(SpecDeepMapError, FileNotFoundError):
    """A required file does not exist."""


class UnreadableInputError(SpecDeepMapError, OSError):
    """A file exists but cannot be read as what it should be (raster, CSV, checkpoint)."""


class UnsafeModelFileError(SpecDeepMapError, ValueError):
    """A model file holds something other than plain data and tensors."""


class DeviceUnavailableError(SpecDeepMapError, RuntimeError):
    """The requested compute device (e.g. a GPU) is not available."""


class PromotionRefusedError(SpecDeepMapError, RuntimeError):
    """A model version does not meet the promotion rule (and promotion was not forced)."""


class OutputConflictError(SpecDeepMapError, FileExistsError):
    """An output would replace an input, another output, or a file that is not ours."""
