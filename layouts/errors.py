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
