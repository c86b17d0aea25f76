"""Errors every part of moestream raises for bad input: one line, naming the file and the problem.

The CLI catches :class:`MoestreamError` and prints its message alone (no traceback), so a message
must say what is wrong and where (file, tensor, layer, expert) in one line.
"""


class MoestreamError(Exception):
    """Base class of user-facing errors; ``str(err)`` is the whole one-line message."""


class PackError(MoestreamError):
    """A pack is malformed, incomplete, corrupt, or of an unknown version."""


class SafetensorsError(MoestreamError):
    """A safetensors file is truncated, malformed, or does not hold what its index says."""


class OptionError(MoestreamError):
    """An option with a value that cannot be used. ``option`` is the library's name for it (a field or
    argument name); the CLI turns it into its flag (``experts_per_token`` -> ``--experts-per-token``)."""

    def __init__(self, option: str, value: object, reason: str):
        super().__init__(f"{option}={value!r}: {reason}")
        self.option, self.value, self.reason = option, value, reason
