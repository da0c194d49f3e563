#!/usr/bin/env bash
# End-to-end on a real cluster (kind), opt-in and never run by CI: build the
# image, install the chart, reproduce the leak in a small sidecar workload, and
# check that a Report policy reports it and a KillSockets policy kills it.
#
#   e2e/run-kind.sh                 # creates and deletes the kind cluster halfclose-e2e
#   KEEP_CLUSTER=1 e2e/run-kind.sh  # leaves the cluster up for a look around
#
# Needs docker, kind, kubectl and helm on PATH. See e2e/README.md.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
CLUSTER=${HALFCLOSE_E2E_CLUSTER:-halfclose-e2e}
IMAGE=${HALFCLOSE_E2E_IMAGE:-halfclose:e2e}
NAMESPACE=halfclose
APP_NAMESPACE=e2e-app
KEEP_CLUSTER=${KEEP_CLUSTER:-0}
TIMEOUT=${HALFCLOSE_E2E_TIMEOUT:-300}  # seconds for each wait below
CONTEXT="kind-$CLUSTER"

log() { printf 'e2e: %s\n' "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }
kc() { kubectl --context "$CONTEXT" "$@"; }

for tool in docker kind kubectl helm; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool is not installed"
done

# wait_for DESCRIPTION COMMAND...: retry COMMAND every 3 s for at most $TIMEOUT s.
wait_for() {
  local what=$1 deadline=$((SECONDS + TIMEOUT))
  shift
  log "waiting for $what (up to ${TIMEOUT}s)"
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "timed out waiting for $what"
    sleep 3
  done
}

diagnose() {
  log "state of the cluster:"
  kc get pods -A -o wide || true
  kc get hcp,hcr -A || true
  kc -n "$NAMESPACE" logs daemonset/halfclose-agent --tail=100 || true
  kc -n "$NAMESPACE" logs deployment/halfclose-operator --tail=50 || true
  kc -n "$APP_NAMESPACE" logs client -c app --tail=20 || true
}

created_cluster=0
cleanup() {
  local status=$?
  ((status == 0)) || diagnose
  if ((created_cluster)) && [[ $KEEP_CLUSTER != 1 ]]; then
    log "deleting kind cluster $CLUSTER"
    kind delete cluster --name "$CLUSTER" || true
  elif ((created_cluster)); then
    log "cluster kept: kubectl --context $CONTEXT get hcr -A; kind delete cluster --name $CLUSTER"
  fi
  exit "$status"
}
trap cleanup EXIT

if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  log "reusing kind cluster $CLUSTER"
else
  log "creating kind cluster $CLUSTER"
  kind create cluster --name "$CLUSTER" --wait 120s
  created_cluster=1
fi

# One image per program (the Dockerfile's targets): <repo>-agent:<tag>, <repo>-operator:<tag>.
AGENT_IMAGE="${IMAGE%:*}-agent:${IMAGE##*:}"
OPERATOR_IMAGE="${IMAGE%:*}-operator:${IMAGE##*:}"
log "building $AGENT_IMAGE and $OPERATOR_IMAGE"
docker build --target agent -t "$AGENT_IMAGE" "$REPO"
docker build --target operator -t "$OPERATOR_IMAGE" "$REPO"
kind load docker-image "$AGENT_IMAGE" "$OPERATOR_IMAGE" --name "$CLUSTER"

log "installing the chart"
kc create namespace "$NAMESPACE" --dry-run=client -o yaml | kc apply -f -
kc label namespace "$NAMESPACE" pod-security.kubernetes.io/enforce=privileged --overwrite
helm --kube-context "$CONTEXT" upgrade --install halfclose "$REPO/charts/halfclose" \
  --namespace "$NAMESPACE" --wait --timeout "${TIMEOUT}s" \
  --set agent.image.repository="${AGENT_IMAGE%:*}" --set agent.image.tag="${IMAGE##*:}" \
  --set operator.image.repository="${OPERATOR_IMAGE%:*}" --set operator.image.tag="${IMAGE##*:}" \
  --set image.pullPolicy=Never
kc -n "$NAMESPACE" rollout status daemonset/halfclose-agent --timeout "${TIMEOUT}s"
kc -n "$NAMESPACE" rollout status deployment/halfclose-operator --timeout "${TIMEOUT}s"

log "deploying the leaking workload"
# The workload's lab programs (halfclose.lab) ship in the agent image, with the CLI.
sed "s|IMAGE|$AGENT_IMAGE|g" "$REPO/e2e/manifests/workload.yaml" | kc apply -f -
kc -n "$APP_NAMESPACE" rollout status deployment/upstream --timeout "${TIMEOUT}s"
kc -n "$APP_NAMESPACE" wait pod/client --for=condition=Ready --timeout "${TIMEOUT}s"

# --- 1. Report: the leak is found and reported, nothing is touched.
kc apply -f "$REPO/e2e/manifests/policy-report.yaml"
reported_leaks() {
  local leaked
  leaked=$(kc -n "$APP_NAMESPACE" get hcr client -o jsonpath='{.status.leaked}')
  [[ ${leaked:-0} -ge 1 ]]
}
wait_for "a HalfCloseReport with leaked sockets for pod $APP_NAMESPACE/client" reported_leaks
kc -n "$APP_NAMESPACE" get hcr client
killed=$(kc -n "$APP_NAMESPACE" get hcr client -o jsonpath='{.status.killedTotal}')
[[ ${killed:-0} -eq 0 ]] || die "a Report policy killed $killed sockets"

# --- 2. KillSockets: the leaked sockets are destroyed and an Event says so.
kc apply -f "$REPO/e2e/manifests/policy-kill.yaml"
sockets_killed() {
  local killed
  killed=$(kc -n "$APP_NAMESPACE" get hcr client -o jsonpath='{.status.killedTotal}')
  [[ ${killed:-0} -ge 1 ]]
}
wait_for "the agent to kill leaked sockets" sockets_killed
kill_event() {
  kc -n "$APP_NAMESPACE" get events --field-selector reason=LeakedSocketsKilled \
    -o jsonpath='{.items[0].message}' | grep -q 'Killed'
}
wait_for "a LeakedSocketsKilled event on the pod" kill_event

kc get hcp
kc get hcr -A
log "PASSED: leak reported, then killed"
