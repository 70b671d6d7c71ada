#!/usr/bin/env bash
# exfilguard on a real two-node k3s cluster in Lima VMs, end to end:
#
#   1. two Ubuntu VMs (k3s server + agent), checked for BTF and cgroup v2;
#   2. the agent and controller images built and loaded into k3s;
#   3. certificates (deploy/make-certs.sh), then the Helm chart;
#   4. an attacker and a backup receiver on the nodes, outside the cluster
#      CIDRs; two exfiltrating pods (bulk upload, DNS) and two benign ones;
#   5. assertions: incident opened and contained, NetworkPolicy and
#      quarantine label on that pod only, its egress blocked, the alert
#      delivered to the in-cluster sink, benign pods untouched, and release
#      restoring traffic.
#
# Needs a workstation with Lima (>= 1.0), kubectl, helm, jq, Rust (for
# exfilctl and the certificates) and a container engine (docker or podman,
# $CONTAINER_ENGINE). KEEP=1 leaves the cluster running (KUBECONFIG is in
# target/lima/kubeconfig); otherwise both VMs are deleted at the end.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
work=${WORK_DIR:-$root/target/lima}
engine=${CONTAINER_ENGINE:-docker}
server=exfilguard-server
agent=exfilguard-agent
app_ns=exfil-lima
sys_ns=exfilguard-system
pf_pid=

log() { printf '\n== %s\n' "$*" >&2; }
pass() { printf '   ok: %s\n' "$*" >&2; }
fail() {
  printf 'FAIL: %s\n' "$*" >&2
  exit 1
}
need() { command -v "$1" >/dev/null || fail "$1 is not installed"; }

# wait_for SECONDS DESCRIPTION COMMAND...: retries COMMAND every 3 s.
wait_for() {
  local seconds=$1 what=$2
  shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || fail "$what: not within ${seconds}s"
    sleep 3
  done
  pass "$what"
}

cleanup() {
  set +e
  [[ -n $pf_pid ]] && kill "$pf_pid" 2>/dev/null
  if [[ ${KEEP:-0} == 1 ]]; then
    echo "KEEP=1: cluster left running; export KUBECONFIG=$work/kubeconfig" >&2
  else
    limactl delete --force "$server" "$agent" >/dev/null 2>&1
  fi
}
trap cleanup EXIT
trap 'exit 143' TERM INT

for tool in limactl kubectl helm jq cargo "$engine"; do need "$tool"; done
mkdir -p "$work"

# --- 1. The cluster -----------------------------------------------------------
log "starting the Lima VMs"
for vm in "$server" "$agent"; do
  role=${vm#exfilguard-}
  if limactl list -q | grep -qx "$vm"; then
    limactl start --tty=false "$vm"
  else
    limactl start --tty=false --name "$vm" "$here/k3s-$role.yaml"
  fi
done

ip_of() { limactl shell "$1" ip -4 -o addr show dev lima0 | awk '{print $4}' | cut -d/ -f1; }
server_ip=$(ip_of "$server")
agent_ip=$(ip_of "$agent")
[[ -n $server_ip && -n $agent_ip ]] || fail "no lima0 address on the VMs"

log "joining the k3s agent to the server ($server_ip)"
if ! limactl shell "$agent" systemctl is-active --quiet k3s-agent; then
  token=$(limactl shell "$server" sudo cat /var/lib/rancher/k3s/server/node-token)
  limactl shell "$agent" sudo env K3S_URL="https://$server_ip:6443" K3S_TOKEN="$token" \
    INSTALL_K3S_EXEC="agent --node-ip=$agent_ip --flannel-iface=lima0" \
    /usr/local/bin/k3s-install.sh
fi
limactl shell "$server" cat /etc/rancher/k3s/k3s.yaml >"$work/kubeconfig"
export KUBECONFIG=$work/kubeconfig
two_nodes_ready() { [[ $(kubectl get nodes --no-headers 2>/dev/null | grep -cw Ready) == 2 ]]; }
wait_for 300 "two nodes Ready" two_nodes_ready
node_server=$(limactl shell "$server" hostname)
node_agent=$(limactl shell "$agent" hostname)

# --- 2. Images ----------------------------------------------------------------
log "building the images"
"$engine" build -f "$root/deploy/docker/agent.Dockerfile" -t exfilguard-agent:lima "$root"
"$engine" build -f "$root/deploy/docker/controller.Dockerfile" -t exfilguard-controller:lima "$root"
for vm in "$server" "$agent"; do
  for image in exfilguard-agent:lima exfilguard-controller:lima; do
    "$engine" save "$image" | limactl shell "$vm" sudo k3s ctr images import -
  done
done

# --- 3. Certificates and the chart -------------------------------------------
log "certificates and exfilctl"
cargo build --release --manifest-path "$root/Cargo.toml" -p exfilguard-controller --bins
kubectl create namespace "$sys_ns" --dry-run=client -o yaml | kubectl apply -f -
EXFILGUARD_CONTROLLER="$root/target/release/exfilguard-controller" \
  "$root/deploy/make-certs.sh" --out "$work/pki" --namespace "$sys_ns"

log "installing the chart"
cat >"$work/values.yaml" <<VALUES
agent:
  image: {repository: exfilguard-agent, tag: lima, pullPolicy: Never}
controller:
  image: {repository: exfilguard-controller, tag: lima, pullPolicy: Never}
  config:
    alerts:
      retry: {initial_backoff_ms: 500, max_backoff_ms: 5000}
      sinks:
        - name: lima-sink
          kind: webhook
          url: {value: "http://alert-sink.$app_ns.svc.cluster.local:8080/alerts"}
agentPolicy:
  volume_threshold_bytes: 100000000
  volume_window: 10m
  action: lockdown
  internal_cidrs: [10.42.0.0/16, 10.43.0.0/16]
  allow_cidrs: ["$agent_ip/32"]
  allow_domains: []
VALUES
helm upgrade --install exfilguard "$root/deploy/helm/exfilguard" -n "$sys_ns" \
  -f "$work/values.yaml" --wait --timeout 5m
kubectl -n "$sys_ns" rollout status daemonset/exfilguard-agent --timeout=180s
agents_ready() { [[ $(kubectl -n "$sys_ns" get ds exfilguard-agent -o jsonpath='{.status.numberReady}') == 2 ]]; }
wait_for 120 "an agent Ready on each node" agents_ready

# --- 4. Receivers and workloads ----------------------------------------------
log "receivers: attacker $server_ip:9000, allowlisted backup $agent_ip:9001"
receiver() { # VM PORT
  limactl shell "$1" sudo systemctl stop "exfil-receiver-$2" >/dev/null 2>&1 || true
  limactl shell "$1" sudo systemd-run --collect --unit="exfil-receiver-$2" \
    socat -u "TCP-LISTEN:$2,fork,reuseaddr" OPEN:/dev/null
}
receiver "$server" 9000
receiver "$agent" 9001

log "workloads"
sed -e "s/@ATTACKER_IP@/$server_ip/g" -e "s/@BACKUP_IP@/$agent_ip/g" \
  -e "s/@NODE_SERVER@/$node_server/g" -e "s/@NODE_AGENT@/$node_agent/g" \
  "$here/workloads.yaml" | kubectl apply -f -
kubectl -n "$app_ns" wait --for=condition=Ready pod --all --timeout=300s

# --- 5. Assertions ------------------------------------------------------------
kubectl -n "$sys_ns" port-forward svc/exfilguard-controller 17443:7443 >/dev/null 2>&1 &
pf_pid=$!
pki=$work/pki
exfilctl() {
  "$root/target/release/exfilctl" --endpoint https://127.0.0.1:17443 --ca "$pki/ca.pem" \
    --cert "$pki/responder.pem" --key "$pki/responder-key.pem" "$@"
}
wait_for 30 "exfilctl reaches the controller" exfilctl nodes
incident_for() { # WORKLOAD (ns/pod): the id of its newest incident, or nothing
  exfilctl incidents list --all -o json |
    jq -r --arg w "$1" '[.[] | select(.workload == $w)] | sort_by(.opened_at) | last | .id // empty'
}
has_incident() { [[ -n $(incident_for "$1") ]]; }
state_is() { [[ $(exfilctl incidents show "$1" -o json | jq -r .state) == "$2" ]]; }
quarantine_label() { kubectl -n "$app_ns" get pod "$1" -o jsonpath='{.metadata.labels.exfilguard\.io/quarantine}'; }
label_is() { [[ $(quarantine_label "$1") == "$2" ]]; }
policy_exists() { kubectl -n "$app_ns" get networkpolicy "exfilguard-lockdown-$1"; }
policy_gone() { ! policy_exists "$1"; }
reaches_attacker() { kubectl -n "$app_ns" exec "$1" -- sh -c "echo probe | nc -w 5 $server_ip 9000"; }
alert_delivered() { kubectl -n "$app_ns" logs deploy/alert-sink | grep -F ALERT | grep -qF "$1"; }

log "bulk upload"
wait_for 240 "incident opened for $app_ns/exfil-upload" has_incident "$app_ns/exfil-upload"
upload_id=$(incident_for "$app_ns/exfil-upload")
wait_for 60 "$upload_id contained" state_is "$upload_id" contained
wait_for 60 "quarantine label $upload_id on exfil-upload" label_is exfil-upload "$upload_id"
wait_for 60 "NetworkPolicy exfilguard-lockdown-exfil-upload" policy_exists exfil-upload
selected=$(kubectl -n "$app_ns" get networkpolicy exfilguard-lockdown-exfil-upload -o json |
  jq -r '.spec.podSelector.matchLabels | to_entries | map("\(.key)=\(.value)") | join(",")')
[[ $(kubectl -n "$app_ns" get pods -l "$selected" -o name) == pod/exfil-upload ]] ||
  fail "the lockdown policy selects more than exfil-upload ($selected)"
pass "the lockdown policy selects exfil-upload only"
if reaches_attacker exfil-upload >/dev/null 2>&1; then fail "exfil-upload still reaches the attacker"; fi
pass "egress from exfil-upload blocked"
wait_for 120 "alert for $upload_id delivered to the in-cluster sink" alert_delivered "$upload_id"

log "DNS exfiltration"
wait_for 300 "incident opened for $app_ns/exfil-dns" has_incident "$app_ns/exfil-dns"
dns_id=$(incident_for "$app_ns/exfil-dns")
kind=$(exfilctl incidents show "$dns_id" -o json | jq -r .kind)
[[ $kind == dns* ]] || fail "exfil-dns incident $dns_id is of kind $kind"
pass "$dns_id is a $kind incident"

log "benign workloads"
for pod in web backup; do
  has_incident "$app_ns/$pod" && fail "an incident for benign $pod"
  [[ -z $(quarantine_label "$pod") ]] || fail "benign $pod carries the quarantine label"
  policy_gone "$pod" || fail "a lockdown NetworkPolicy for benign $pod"
  pass "$pod: no incident, no label, no policy"
done
sink_pod=$(kubectl -n "$app_ns" get pod -l app=alert-sink -o jsonpath='{.items[0].metadata.name}')
[[ -z $(quarantine_label "$sink_pod") ]] || fail "the alert sink carries the quarantine label"

log "release"
exfilctl incidents release "$upload_id" --reason "lima harness: verified"
wait_for 60 "$upload_id released" state_is "$upload_id" released
wait_for 60 "quarantine label removed" label_is exfil-upload ""
wait_for 60 "lockdown NetworkPolicy removed" policy_gone exfil-upload
wait_for 60 "exfil-upload reaches the attacker again" reaches_attacker exfil-upload

log "all expectations held"
exfilctl incidents list --all
