"""What the controller needs from whoever keeps workflow runs: take a person's decision.

The run dispatcher implements it; the controller relays Approvals through it and never
touches run state itself, so an Approval and a run's own events meet in one place.
"""

from __future__ import annotations

from typing import Literal, Protocol

from shoal_api.runs.model import ApprovalDecided

DecideOutcome = Literal["Applied", "NotWaiting", "RunNotFound"]
"""Applied: the run took the decision. NotWaiting: the step is not waiting for approval
(decided already, timed out, not reached yet). RunNotFound: no such run of that Workflow."""


class RunGate(Protocol):
    async def decide(
        self, namespace: str, run: str, event: ApprovalDecided, *, workflow: str
    ) -> tuple[DecideOutcome, str]:
        """Feeds ``event`` to the run and says what became of it, with a sentence for the
        Approval's status. ``workflow`` is the Approval's: a run of another Workflow is
        RunNotFound. Deciding the same (approver, step, at) again after it was Applied
        should answer Applied again: a relay whose status write was lost is repeated.
        Raises when the run store cannot be reached (the relay is retried)."""
        ...
