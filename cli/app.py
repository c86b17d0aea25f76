"""The ``moestream`` click group, and what every command shares: one-line errors and byte sizes.

Only the CLI prints. Library errors name the problem (a runtime option by its field name); here they
become ``error: ...`` on stderr with the flag's name, exit status 1, and no traceback unless ``-v``.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from moestream.runtime.cpu.threads import prefer_passive_wait

# Before torch, transformers or a tokenizer load libgomp, which reads the policy once: the commands'
# own imports (mlx-lm's model code imports its tokenizers) come after this module.
prefer_passive_wait()

import click  # noqa: E402

from moestream.layouts.errors import MoestreamError  # noqa: E402


def _verbose() -> int:
    ctx = click.get_current_context(silent=True)
    return (ctx.find_root().params.get("verbose") or 0) if ctx is not None else 0


def _interrupted(e: BaseException) -> bool:
    """Ctrl-C that surfaced as another exception: a compiled function (numba) interrupted mid-call
    returns with the KeyboardInterrupt set, which Python reports as a SystemError caused by it."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


@contextmanager
def ctrl_c_kept() -> Iterator[Callable[[], None]]:
    """Ctrl-C that cannot be lost: the handler raises KeyboardInterrupt as Python's does and also
    remembers it, and the returned ``check()``, called between tokens, raises it again. (A compiled
    function interrupted mid-call can hand the KeyboardInterrupt on as another error, which code
    between the kernels and this loop may not pass on.) A Ctrl-C the process was started to ignore
    stays ignored."""
    hit = []
    installed = threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) not in (
        signal.SIG_IGN,
        None,
    )

    def handler(signum, frame):
        hit.append(signum)
        raise KeyboardInterrupt

    def check() -> None:
        if hit:
            raise KeyboardInterrupt

    prev = signal.signal(signal.SIGINT, handler) if installed else None
    try:
        yield check
    finally:
        if installed:
            signal.signal(signal.SIGINT, prev)


def one_line_errors(fn):
    """Turn errors into ``error: ...`` on stderr and exit status 1 (130 on Ctrl-C): user-facing ones
    as they are worded, OS errors with their file, anything unexpected with its type and a pointer to
    ``-v`` (which prints the traceback too)."""
    from moestream.layouts.errors import OptionError

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except OptionError as e:
            click.echo(f"error: --{e.option.replace('_', '-')} {e.value}: {e.reason}", err=True)
            sys.exit(1)
        except MoestreamError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            click.echo(f"error: {where}{e.strerror or e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except Exception as e:  # a defect: still one line, the traceback on request
            if _interrupted(e):
                click.echo("interrupted", err=True)
                sys.exit(130)
            if _verbose():
                traceback.print_exc()
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            hint = "" if _verbose() else " (run with -v for the traceback)"
            click.echo(f"error: {type(e).__name__}{': ' + first if first else ''}{hint}", err=True)
            sys.exit(1)

    return wrapper


@click.group()
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug) and tracebacks of errors.")
@click.version_option(package_name="moestream")
def cli(verbose: int) -> None:
    """moestream: run Mixture-of-Experts models larger than RAM by streaming experts from SSD."""
    level = logging.WARNING if not verbose else logging.INFO if verbose == 1 else logging.DEBUG
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # e.g. "sequence longer than model_max_length"
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def human(n: float) -> str:
    """Bytes as B, KiB, MiB, GiB or TiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)
