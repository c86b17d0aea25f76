"""Every error the CLI meets ends in one line on stderr (``error: ...``), never a raw traceback;
``-v`` adds the traceback for a defect; runtime option errors name the flag."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from moestream.main import cli


def _run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_an_unexpected_exception_is_one_line(tmp_path, monkeypatch):
    import moestream.layouts

    def boom(path):
        raise ValueError("something inside went wrong\nsecond line")

    monkeypatch.setattr(moestream.layouts, "open_pack", boom)
    r = _run("inspect", tmp_path)
    assert r.exit_code == 1
    assert "Traceback" not in r.output
    lines = r.output.strip().splitlines()
    assert lines == ["error: ValueError: something inside went wrong (run with -v for the traceback)"]


def test_verbose_adds_the_traceback(tmp_path, monkeypatch):
    import moestream.layouts

    monkeypatch.setattr(moestream.layouts, "open_pack", lambda path: 1 / 0)
    r = _run("-v", "inspect", tmp_path)
    assert r.exit_code == 1
    assert "Traceback" in r.output and r.output.strip().splitlines()[-1] == "error: ZeroDivisionError: division by zero"


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--cache", "lru:lots"], "--cache lru:lots"),
        (["--cache", "fast"], "--cache fast"),
        (["-k", "0"], "--experts-per-token 0"),
    ],
)
def test_runtime_option_errors_name_the_flag(tmp_path, args, flag):
    r = _run("generate", tmp_path, "-p", "hi", *args)
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output.strip().splitlines()[-1].startswith(f"error: {flag}: ")


def test_a_bad_size_is_one_line(tmp_path):
    r = _run("generate", tmp_path, "-p", "hi", "--prefill-buffer", "big")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output.strip().splitlines() == ["error: --prefill-buffer big: expected a size such as 512M or 8G"]


def test_ctrl_c_inside_a_compiled_function_is_an_interrupt(tmp_path, monkeypatch):
    """numba returns from an interrupted call with KeyboardInterrupt set; Python raises a SystemError
    caused by it. The CLI reports that as Ctrl-C: "interrupted", exit 130."""
    import moestream.layouts

    def interrupted(path):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as k:
            raise SystemError("CPUDispatcher(<function rms_norm>) returned a result with an exception set") from k

    monkeypatch.setattr(moestream.layouts, "open_pack", interrupted)
    r = _run("inspect", tmp_path)
    assert r.exit_code == 130 and r.output.strip() == "interrupted"


def test_a_swallowed_ctrl_c_is_raised_again_between_tokens():
    """The generate and chat loops' Ctrl-C: kept when something between the kernels and the loop
    lost the KeyboardInterrupt; ignored where the process was started to ignore it; the previous
    handler back afterwards."""
    import os
    import signal
    import time

    from moestream.app import ctrl_c_kept

    before = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a harness may start the suite ignoring it
    with ctrl_c_kept() as check:
        check()  # nothing yet
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs here
        except KeyboardInterrupt:
            pass  # lost, as a compiled call's caller may lose it
        with pytest.raises(KeyboardInterrupt):
            check()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with ctrl_c_kept() as check:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
            check()  # ignored, as the process was told
    finally:
        signal.signal(signal.SIGINT, before)
