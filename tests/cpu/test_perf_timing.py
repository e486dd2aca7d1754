"""perf.timing's alternation, on CPU (a fake timer stands in for the CUDA events)."""

from perf.timing import quantiles, time_many

US = {"a": 10.0, "b": 20.0, "c": 40.0}  # the fake timer's per-call figure of each function


def _timed(fns_names, **kwargs):
    """time_many over functions that log their calls; returns (result, log). A timed block shows
    in the log as ("block", name), a call outside a block as name."""
    log = []
    fns = {name: (lambda name=name: log.append(name)) for name in fns_names}

    def timer(fn, inner):
        assert inner == 7
        fn()
        name = log.pop()
        log.append(("block", name))
        return US[name] + sum(1 for e in log if e == ("block", name))  # varies block to block

    return time_many(fns, inner=7, timer=timer, **kwargs), log


def test_time_many_warms_up_settles_and_rotates():
    # settle 40 us: 4 calls of a, 2 of b, 1 of c before a block of it (when another ran last)
    timed, log = _timed("abc", repeats=3, settle_s=40e-6)
    warm = ["a", ("block", "a"), "b", ("block", "b"), "c", ("block", "c")]
    assert log[:6] == warm  # a warm-up call and a discarded block each, in order
    a, b, c = ["a"] * 4 + [("block", "a")], ["b"] * 2 + [("block", "b")], ["c", ("block", "c")]
    assert log[6:] == a + b + c + b + c + a + c + a + b  # the first in a round moves along
    assert list(timed) == ["a", "b", "c"]
    # each function's own samples: its 2nd to 4th blocks (the 1st was discarded)
    assert timed["a"] == quantiles([12.0, 13.0, 14.0])
    assert timed["c"]["median"] > timed["b"]["median"] > timed["a"]["median"]


def test_time_many_of_one_function_does_not_settle_between_its_own_blocks():
    timed, log = _timed("a", repeats=4, settle_s=1.0)
    assert log == ["a"] + [("block", "a")] * 5
    assert timed["a"]["median"] == 13.5


def test_quantiles():
    q = quantiles([5.0, 1.0, 4.0, 2.0, 3.0])
    assert q == {"median": 3.0, "p20": 2.0, "p80": 5.0}
