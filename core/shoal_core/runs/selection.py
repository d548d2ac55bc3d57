"""Which Agent serves a step that names a capability (``agentSelector``).

Pure, so the dispatcher's choice is testable without a cluster: it passes the candidates
(Agents declaring the capability, sorted) and what it observed of them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

Strategy = Literal["LeastLag", "BestSuccessRate", "RoundRobin"]


def choose(
    strategy: Strategy,
    candidates: Sequence[str],
    *,
    lag: Mapping[str, int],
    success: Mapping[str, float],
    turn: int,
) -> str:
    """One of ``candidates`` (not empty).

    - LeastLag: the fewest tasks pending + in flight; an Agent with no figure yet counts
      as idle (a new Agent should get work, not wait for a measurement).
    - BestSuccessRate: the highest share of succeeded tasks over the dispatcher's window;
      an Agent with no record yet counts as perfect, for the same reason.
    - RoundRobin: ``turn`` modulo the candidates.

    Ties go to the earlier candidate (and for LeastLag/BestSuccessRate rotate by
    ``turn``, so equal Agents share the work instead of the first taking it all).
    """
    if not candidates:
        raise ValueError("no candidate Agents")
    n = len(candidates)
    rotated = [candidates[(turn + i) % n] for i in range(n)]
    if strategy == "RoundRobin":
        return rotated[0]
    if strategy == "LeastLag":
        return min(rotated, key=lambda a: lag.get(a, 0))
    return max(rotated, key=lambda a: success.get(a, 1.0))
