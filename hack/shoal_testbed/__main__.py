"""``python -m shoal_testbed up|down|status|bin [--dir .cluster]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shoal_testbed.binaries import control_plane_bin
from shoal_testbed.cluster import LocalCluster, TestbedError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="shoal-testbed",
        description=(
            "A local Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager, "
            "kube-scheduler, kwok fake nodes) and NATS JetStream on loopback."
        ),
    )
    parser.add_argument("command", choices=["up", "down", "status", "bin"])
    parser.add_argument(
        "--dir", type=Path, default=Path(".cluster"), help="state directory (default: .cluster)"
    )
    args = parser.parse_args(argv)
    cluster = LocalCluster(args.dir)
    try:
        if args.command == "up":
            cluster.up()
        elif args.command == "down":
            cluster.down()
        elif args.command == "bin":
            print(control_plane_bin())
        else:
            up = cluster.is_up()
            print(f"{'up' if up else 'down'}: {cluster.dir}")
            return 0 if up else 1
    except TestbedError as exc:
        print(f"[shoal] ERROR: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
