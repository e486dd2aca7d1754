"""perf.record's helpers, on CPU."""

import pytest

from perf.record import knob_values


def test_vary_parses_knob_values_and_rejects_a_spec_without_values():
    assert knob_values(["dispatch_ctas=32,64", "chunk=16", "pack=scan"]) == [
        ("dispatch_ctas", 32),
        ("dispatch_ctas", 64),
        ("chunk", 16),
        ("pack", "scan"),
    ]
    with pytest.raises(SystemExit, match="KNOB=V1,V2"):
        knob_values(["dispatch_ctas"])
