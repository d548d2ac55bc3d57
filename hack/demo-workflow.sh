#!/usr/bin/env bash
# The workflow part of `make demo`: two runs of the customer-inquiry Workflow
# (examples/customer-inquiry.yaml) on the local cluster, whose Agents must be Ready.
#
#   1. examples/inputs/inquiry.json: auth, then classify || compliance, then answer, which
#      waits for a person. This script is that person: it waits for WaitingApproval,
#      approves with `shoal approve` (a Kubernetes write, as the kubeconfig's user), and
#      follows the run to its end.
#   2. examples/inputs/spam.json: classify says spam, so answer's `when` is false and the
#      run ends without an answer (and without asking anybody).
#
# Needs SHOAL_NATS_URL and KUBECONFIG (the Makefile sets both, and CLUSTER_DIR for the pod
# logs); usage: demo-workflow.sh [NS]
set -euo pipefail

NS=${1:-support}
WORKFLOW=customer-inquiry
SHOAL=${SHOAL:-.venv/bin/shoal}
PY=${PY:-.venv/bin/python}
CLUSTER_DIR=${CLUSTER_DIR:-.cluster}
APPROVAL_DEADLINE=${APPROVAL_DEADLINE:-120}   # seconds until `answer` must be waiting

log() { printf '[shoal] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
# Echoes the command before running it, like make does for its own lines.
run() { printf '%q ' "$@" | sed 's/ $//' >&2; printf '\n' >&2; "$@"; }

: "${SHOAL_NATS_URL:?SHOAL_NATS_URL must name the local NATS}"
: "${KUBECONFIG:?KUBECONFIG must name the local cluster (shoal approve writes an Approval)}"
export SHOAL_NATS_URL KUBECONFIG

# `phase STEP`: "<run phase> <step phase>" of the run $RUN, read from its record.
phase() {
  "$SHOAL" runs get "$RUN" -n "$NS" -o json | "$PY" -c '
import json, sys
run = json.load(sys.stdin)
print(run["phase"], run["steps"][sys.argv[1]]["phase"])' "$1"
}

log "workflow: a customer inquiry (authenticate -> classify || compliance -> answer, approved by a person)"
printf '%s\n' "$SHOAL run $WORKFLOW -n $NS --input @examples/inputs/inquiry.json -o json" >&2
RUN=$("$SHOAL" run "$WORKFLOW" -n "$NS" --input @examples/inputs/inquiry.json -o json \
  | "$PY" -c 'import json, sys; print(json.load(sys.stdin)["run"])')
log "run $RUN created; waiting until its answer step waits for approval (up to ${APPROVAL_DEADLINE}s)"

deadline=$((SECONDS + APPROVAL_DEADLINE))
while :; do
  # A failed read (a get that failed for a moment) just means: look again.
  read -r run_phase answer_phase < <(phase answer) || true
  [[ $answer_phase == WaitingApproval ]] && break
  case $run_phase in
    Succeeded | Failed)
      "$SHOAL" runs get "$RUN" -n "$NS" || true
      die "run $RUN ended ($run_phase) before asking for approval"
      ;;
  esac
  ((SECONDS < deadline)) || {
    "$SHOAL" runs get "$RUN" -n "$NS" || true
    die "run $RUN: answer still $answer_phase after ${APPROVAL_DEADLINE}s"
  }
  sleep 0.5
done

# What the approver decides on: the step table, then classify's category and compliance's
# verdict (on the Agent the selector picked, with auth's profile from the run context).
run "$SHOAL" runs get "$RUN" -n "$NS"
"$SHOAL" runs get "$RUN" -n "$NS" -o json | "$PY" -c '
import json, sys
steps = json.load(sys.stdin)["steps"]
c = steps["compliance"]["output"]
print("[shoal] classify: %s; compliance on %s (agentSelector): allowed=%s flags=%s,"
      " customer profile from %s" % (steps["classify"]["output"]["category"], c["checkedBy"],
      c["allowed"], c["flags"], c["profileSource"]))'
run "$SHOAL" approve "$RUN" answer --workflow "$WORKFLOW" -n "$NS" -m "refund ok" --wait
run "$SHOAL" runs get "$RUN" -n "$NS" --watch
# The compliance handler's own log line (each runtime pod is a local process of the test
# bed's kubelet stand-in, logging to $CLUSTER_DIR/logs/pods/).
grep -h "reused the profile.*$RUN" "$CLUSTER_DIR/logs/pods/${NS}_compliance-"*.log >&2 || true

log "workflow: a spam inquiry: classify says spam, so answer is skipped (its when is false)"
run "$SHOAL" run "$WORKFLOW" -n "$NS" --input @examples/inputs/spam.json --watch
run "$SHOAL" runs list -n "$NS" --workflow "$WORKFLOW"
