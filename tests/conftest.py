"""Test tiers: tests/unit (pure logic, no servers) and tests/cluster (real API server,
real nats-server; fixtures in shoal_testbed.fixtures)."""

pytest_plugins = ["shoal_testbed.fixtures"]
