"""The runtime flags every command that runs a pack takes, gathered into one ``options`` argument."""

from __future__ import annotations

import functools

import click

from moestream.app import one_line_errors

# (flag declarations, RuntimeOptions field, click keyword arguments)
_FLAGS = [
    (
        ("--experts-per-token", "-k"),
        "experts_per_token",
        dict(type=int, default=None, help="Override the model's top-k (fewer experts read per token)."),
    ),
    (
        ("--cache",),
        "cache",
        dict(
            default="os",
            show_default=True,
            help="os | os-map (CPU: page-cache hits computed in place, no copy) | "
            "none | lru:SIZE (e.g. lru:8G) | mmap | mmap-none (naive page-fault baselines; -none drops pages).",
        ),
    ),
    (("--threads",), "threads", dict(type=int, default=None, help="Reader threads.")),
    (("--no-verify",), "verify", dict(is_flag=True, help="Skip the per-read checksum of expert blocks.")),
    (
        ("--kernels",),
        "kernels",
        dict(
            type=click.Choice(["auto", "metal", "numba", "mlx"]),
            default="auto",
            show_default=True,
            help="Expert kernels: auto (Metal's on Apple silicon, numba's where MLX runs on the CPU), metal, numba, "
            "or mlx (MLX's built-in quantized ops).",
        ),
    ),
    (
        ("--prefill-buffer",),
        "prefill_buffer",
        dict(
            default=None,
            metavar="SIZE",
            help="Prefill's expert ring (numba kernels, os/none caches): reads start "
            "at each layer's entry and run through its compute [default: 4G, at most RAM/8; 0: off].",
        ),
    ),
]


def _size(value: str | None, option: str) -> int | None:
    from moestream.layouts.errors import OptionError
    from moestream.runtime.options import parse_size

    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError:
        raise OptionError(option, value, "expected a size such as 512M or 8G") from None


def _call(fn, a, kw, fields):
    from moestream.runtime.options import RuntimeOptions

    fields["prefill_buffer"] = _size(fields["prefill_buffer"], "prefill_buffer")
    options = RuntimeOptions(**fields)
    if _follower():  # under mlx.launch: ranks > 0 compute experts for rank 0, whatever the command
        from moestream.runtime.model.runtime import follow

        return follow()
    return fn(*a, options=options, **kw)


def _follower() -> bool:
    """Whether this process is a rank > 0 of an ``mlx.launch`` group (joining it first)."""
    import os

    if "MLX_RANK" not in os.environ and "OMPI_COMM_WORLD_SIZE" not in os.environ:
        return False
    from moestream.runtime.model import expert_parallel

    expert_parallel.set_reporter(lambda line: click.echo(f"error: {line}", err=True))
    group = expert_parallel.world()
    return group is not None and group.rank != 0


def runtime_options(fn):
    """Add the runtime flags to a command; it receives them as one ``options`` (a RuntimeOptions).
    Building it is deferred to the call, so ``--help`` imports nothing heavy."""

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        fields = {field: kw.pop(field) for _, field, _ in _FLAGS}
        fields["verify"] = not fields["verify"]  # the flag is --no-verify
        return one_line_errors(_call)(fn, a, kw, fields)  # a bad value is one line too

    for decls, field, kwargs in reversed(_FLAGS):
        wrapper = click.option(*decls, field, **kwargs)(wrapper)
    return wrapper
