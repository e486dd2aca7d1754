"""perf.record's helpers, on CPU."""

import pytest

from perf.record import knob_sets, knob_values


def test_vary_parses_knob_values_and_rejects_a_spec_without_values():
    assert knob_values(["dispatch_ctas=32,64", "chunk=16", "pack=scan"]) == [
        ("dispatch_ctas", 32),
        ("dispatch_ctas", 64),
        ("chunk", 16),
        ("pack", "scan"),
    ]
    # a bool knob's "False" must not stay a (truthy) string
    assert knob_values(["down_tma=True,False"]) == [("down_tma", True), ("down_tma", False)]
    with pytest.raises(SystemExit, match="KNOB=V1,V2"):
        knob_values(["dispatch_ctas"])


def test_vary_refuses_a_value_given_twice():
    for specs in (["gemm1_pairs=1,0,1"], ["chunk=16", "chunk=8,16"]):
        with pytest.raises(SystemExit, match="twice"):
            knob_values(specs)
    assert knob_values(["chunk=16", "block_m=16"]) == [("chunk", 16), ("block_m", 16)]


def test_joined_knobs_make_one_variant():
    assert knob_sets(["half_tiles=True", "block_m=64+num_warps=4", "chunk=8,16"]) == [
        ("half_tiles=True", {"half_tiles": True}),
        ("block_m=64+num_warps=4", {"block_m": 64, "num_warps": 4}),
        ("chunk=8", {"chunk": 8}),
        ("chunk=16", {"chunk": 16}),
    ]
    for bad in (["block_m=64,32+num_warps=4"], ["block_m=64+block_m=32"], ["block_m=64+num_warps"]):
        with pytest.raises(SystemExit):
            knob_sets(bad)
    with pytest.raises(SystemExit, match="twice"):
        knob_sets(["block_m=64+num_warps=4", "block_m=64+num_warps=4"])
