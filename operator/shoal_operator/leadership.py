"""When this replica may act: while it leads (or leads alone), and once NATS is there.

Reconciles, the run dispatcher, the autoscaler and the Approval relay all ask the same
question; answering it in one place keeps a standby from acting in any of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

from shoal_operator.clients.leader import LeaderElector

# At start-up, reconciles wait this long for NATS before reporting it unavailable.
NATS_GRACE_SECONDS = 10.0


@dataclass
class Charge:
    leader: LeaderElector | None = None
    """None: a single replica, always in charge."""
    nats_ready: asyncio.Event = field(default_factory=asyncio.Event)
    started: float = field(default_factory=time.monotonic)

    def leading(self) -> bool:
        return self.leader is None or self.leader.is_leader()

    async def wait(self) -> None:
        """Until this replica leads, and NATS is connected or the start-up grace is over."""
        if self.leader is not None:
            await self.leader.leading.wait()
        grace = self.started + NATS_GRACE_SECONDS - time.monotonic()
        if grace > 0 and not self.nats_ready.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.nats_ready.wait(), grace)
