"""The errors pyrovae raises for bad input. Each message names the problem and the fix."""


class PyrovaeError(ValueError):
    """Base class of pyrovae's input errors."""


class UnknownNameError(PyrovaeError, KeyError):
    """A family, data set or objective was asked for by a name nobody registered."""

    def __str__(self):  # KeyError would otherwise print the message in quotes
        return str(self.args[0])


class SupportMismatchError(PyrovaeError):
    """The guide puts mass where the prior has none, or the reverse."""


class DataError(PyrovaeError):
    """Data of the wrong shape, with NaN, or outside the likelihood's support."""


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss, or one that exploded by orders of magnitude."""
