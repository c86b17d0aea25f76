"""Tiny random packs for runtime tests: moestream's own checkpoint writer (no torch), converted."""

from pathlib import Path


def tiny_pack(tmp_path_factory, name: str, config: dict, seed: int, bits: int = 4, **options) -> Path:
    """A tiny random checkpoint of ``config`` (moestream's own writer, no torch) converted at ``bits``
    (``options``: other convert options, e.g. ``resident_bits``)."""
    from moestream.convert import convert
    from moestream.convert.tiny import write_tiny_checkpoint

    d = tmp_path_factory.mktemp(name)
    src = write_tiny_checkpoint(d / "src", config, seed=seed)
    convert(str(src), d / f"p{bits}", bits=bits, alignment=4096, **options)
    return d / f"p{bits}"
