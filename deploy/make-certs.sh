#!/usr/bin/env bash
# Makes exfilguard's certificates and the two Secrets the manifests and the
# chart mount:
#   exfilguard-controller-tls  ca.pem, controller.pem, controller-key.pem
#   exfilguard-agent-tls       ca.pem, agent-<node>.pem, agent-<node>-key.pem per node
# and leaves the viewer and responder client certificates (for exfilctl) in
# the output directory. Run it again after adding nodes: the CA in the
# output directory is reused, and the Secrets are updated in place.
#
# Every agent pod mounts the whole agent Secret and picks its own files by
# NODE_NAME, so a node's root can read the other nodes' keys; an agent
# certificate only lets its holder speak for that node to the controller.
# Where that matters, issue per-node certificates with cert-manager's CSI
# driver instead, with the same file names.
#
# Usage: deploy/make-certs.sh [--out DIR] [--namespace NS] [--print] [NODE...]
#   NODE...      node names (default: every node `kubectl get nodes` lists)
#   --out DIR    where the PEM files go (default ./exfilguard-pki; keep it safe)
#   --print      write the Secrets as YAML to stdout instead of applying them
# The controller binary that issues them is $EXFILGUARD_CONTROLLER
# (default: exfilguard-controller on PATH), e.g.
#   EXFILGUARD_CONTROLLER="target/release/exfilguard-controller" deploy/make-certs.sh
set -euo pipefail

out=./exfilguard-pki
namespace=exfilguard-system
print=false
nodes=()
while (($#)); do
  case "$1" in
    --out) out=$2; shift 2 ;;
    --namespace) namespace=$2; shift 2 ;;
    --print) print=true; shift ;;
    -h | --help) sed -n '2,23p' "$0"; exit 0 ;;
    -*) echo "make-certs.sh: unknown option $1" >&2; exit 2 ;;
    *) nodes+=("$1"); shift ;;
  esac
done

read -r -a controller <<<"${EXFILGUARD_CONTROLLER:-exfilguard-controller}"

if ((${#nodes[@]} == 0)); then
  mapfile -t nodes < <(kubectl get nodes -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}')
fi
if ((${#nodes[@]} == 0)); then
  echo "make-certs.sh: no nodes given and none found with kubectl" >&2
  exit 1
fi

# The names agents and exfilctl (through a port-forward) reach the controller by.
service=exfilguard-controller
args=(certs --out "$out"
  --host "$service" --host "$service.$namespace" --host "$service.$namespace.svc"
  --host "$service.$namespace.svc.cluster.local" --host localhost --host 127.0.0.1)
for node in "${nodes[@]}"; do
  args+=(--node "$node")
done
"${controller[@]}" "${args[@]}"

agent_files=(--from-file="ca.pem=$out/ca.pem")
for node in "${nodes[@]}"; do
  agent_files+=(--from-file="agent-$node.pem=$out/agent-$node.pem"
    --from-file="agent-$node-key.pem=$out/agent-$node-key.pem")
done

secrets() {
  kubectl -n "$namespace" create secret generic exfilguard-controller-tls \
    --from-file="ca.pem=$out/ca.pem" \
    --from-file="controller.pem=$out/controller.pem" \
    --from-file="controller-key.pem=$out/controller-key.pem" \
    --dry-run=client -o yaml
  echo ---
  kubectl -n "$namespace" create secret generic exfilguard-agent-tls \
    "${agent_files[@]}" --dry-run=client -o yaml
}

if $print; then
  secrets
else
  secrets | kubectl apply -f -
  echo "Secrets applied in $namespace; exfilctl's certificates: $out/responder.pem, $out/viewer.pem" >&2
fi
