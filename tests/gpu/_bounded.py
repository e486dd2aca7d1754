"""A test body run in a child process with a time bound: a hang fails the test instead of holding
the suite (the child is killed; its traceback, if it failed, is printed above the failure)."""

import multiprocessing

import pytest


def run_bounded(target, args: tuple = (), *, seconds: float, what: str) -> None:
    """``target(*args)`` in a spawned child; fails the test if it runs past ``seconds`` (``what``
    did not finish: a hang) or exits non-zero."""
    child = multiprocessing.get_context("spawn").Process(target=target, args=args)
    child.start()
    child.join(seconds)
    if child.is_alive():
        child.kill()
        pytest.fail(f"{what} did not finish in {seconds} s: a hang")
    assert child.exitcode == 0, f"{what} failed (its traceback is above)"
