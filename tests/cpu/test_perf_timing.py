"""perf.timing's alternation, on CPU (a fake timer stands in for the CUDA events)."""

from perf.timing import quantiles, time_many


def test_time_many_warms_up_then_alternates_with_a_rotating_order():
    calls, blocks = [], []

    def fn(name):
        return lambda: calls.append(name)

    def timer(f, inner):
        assert inner == 7
        f()
        blocks.append(calls[-1])
        return {"a": 1.0, "b": 2.0, "c": 3.0}[calls[-1]] * 10 + len(blocks) % 3

    timed = time_many({"a": fn("a"), "b": fn("b"), "c": fn("c")}, repeats=4, inner=7, timer=timer)
    assert calls[:3] == ["a", "b", "c"]  # one warm-up call each, before any timing
    # every round times each function once, and the one timed first moves along
    assert blocks == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert list(timed) == ["a", "b", "c"]
    # each function's own samples, nobody else's: a's four blocks were the 1st, 6th, 8th, 10th
    assert timed["a"] == quantiles([10 + 1, 10 + 0, 10 + 2, 10 + 1])
    assert timed["c"]["median"] > timed["b"]["median"] > timed["a"]["median"]


def test_quantiles():
    q = quantiles([5.0, 1.0, 4.0, 2.0, 3.0])
    assert q == {"median": 3.0, "p20": 2.0, "p80": 5.0}
