"""The per-call dispatch plan, computed on the device (DESIGN §4-5).

Shape legend: T tokens on this rank (at most T_max), K top-k, R ranks, L physical slots per
rank, P = R * L physical slots (slot ``p = rank * L + local``), S receive rows on a rank (at most
``capacity``), U send units, G send groups (P with sorted dispatch, else R).

Three kernels per call, one after the other on each rank's stream. The unit of work is a *chunk*
of CT tokens (64 (token, k) pairs), so a rank with a whole GPU spreads a call of 4096 tokens over
~500 programs at once; every step is latency-bound, not bandwidth-bound.

  ``plan.count``   ``plan_count_kernel`` and ``plan_scan_kernel``, which never wait: slots,
                   chunk histograms and their scan; the counts are published to every peer.
  ``plan.layout``  ``plan_layout_kernel``, which waits (bounded) for every rank's counts, then
                   writes the rows, the send order and the receiver's tile and dispatch tables.
  ``plan.workspace``  ``PlanWorkspace``: the buffers and the launches.
  ``plan.config``  ``PlanConfig``, ``PlanMeta`` (the kernels' constants) and ``Plan``.

The pure-torch oracle of the whole plan is ``megakernel.reference.plan_ref``.
"""

from megakernel.plan.config import (
    MAX_ROUNDS,
    PROGRAMS_PER_SM,
    STATS,
    Plan,
    PlanConfig,
    PlanMeta,
)
from megakernel.plan.count import PlacementTables, plan_count_kernel, plan_scan_kernel
from megakernel.plan.layout import LayoutOut, plan_layout_kernel
from megakernel.plan.workspace import PlanWorkspace

__all__ = [
    "MAX_ROUNDS",
    "PROGRAMS_PER_SM",
    "STATS",
    "LayoutOut",
    "PlacementTables",
    "Plan",
    "PlanConfig",
    "PlanMeta",
    "PlanWorkspace",
    "plan_count_kernel",
    "plan_layout_kernel",
    "plan_scan_kernel",
]
