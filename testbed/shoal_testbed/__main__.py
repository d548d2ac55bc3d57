"""``python -m shoal_testbed up|down|status|bin [--dir .cluster]``, and
``python -m shoal_testbed kubelet --kubeconfig PATH --state-dir DIR [--namespace NS]``
(the test-bed stand-in for a kubelet that ``up`` starts; see ``shoal_testbed.kubelet``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shoal_testbed.binaries import control_plane_bin
from shoal_testbed.cluster import LocalCluster, TestbedError
from shoal_testbed.signals import stop_on_signals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="shoal-testbed",
        description=(
            "A local Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager, "
            "kube-scheduler, kwok fake nodes) and NATS JetStream on loopback."
        ),
    )
    state = argparse.ArgumentParser(add_help=False)
    state.add_argument(
        "--dir", type=Path, default=Path(".cluster"), help="state directory (default: .cluster)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", parents=[state], help="start the test bed (idempotent)")
    up.add_argument(
        "--no-kubelet",
        action="store_true",
        help="do not run Agent pods as local processes (kwok alone: pods run nothing)",
    )
    sub.add_parser("down", parents=[state], help="stop the test bed and remove its state")
    sub.add_parser("status", parents=[state], help="exit 0 when the test bed is up")
    sub.add_parser("bin", parents=[state], help="print the control-plane binaries' directory")
    kubelet = sub.add_parser(
        "kubelet",
        help="TEST-BED STAND-IN FOR A KUBELET (not part of Shoal): run Agent pods as processes",
        description=(
            "Runs each pod labelled shoal.dev/agent that is bound to a node as a local "
            "process (python -m shoal_runtime, or the JSON list in SHOAL_STANDIN_COMMAND), "
            "at most SHOAL_STANDIN_MAX_PODS (32) at once. Without --namespace it skips "
            "namespaces labelled shoal.dev/standin=off."
        ),
    )
    kubelet.add_argument("--kubeconfig", type=Path, required=True)
    kubelet.add_argument(
        "--state-dir",
        type=Path,
        required=True,
        help="standin.json and logs/pods/<ns>_<pod>.log go here",
    )
    kubelet.add_argument(
        "--namespace", help="only this namespace (whatever its shoal.dev/standin label)"
    )
    kubelet.add_argument(
        "--max-pods", type=int, help="processes at once (default: $SHOAL_STANDIN_MAX_PODS or 32)"
    )
    args = parser.parse_args(argv)
    if args.command == "kubelet":
        from shoal_testbed import kubelet as standin

        return standin.main(args.kubeconfig, args.state_dir, args.namespace, args.max_pods)
    cluster = LocalCluster(args.dir)
    try:
        if args.command == "up":
            # Interrupted while starting (SIGTERM, Ctrl-C): up() stops what it started.
            # Once up, it returns and leaves the test bed running in the background.
            stop_on_signals()
            cluster.up(kubelet=not args.no_kubelet)
        elif args.command == "down":
            cluster.down()
        elif args.command == "bin":
            print(control_plane_bin())
        else:
            up_now = cluster.is_up()
            print(f"{'up' if up_now else 'down'}: {cluster.dir}")
            return 0 if up_now else 1
    except TestbedError as exc:
        print(f"[shoal] ERROR: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
