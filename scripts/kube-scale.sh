#!/usr/bin/env bash
# The cluster store at scale, on a real API server: `soak --store kubernetes` with N replicas
# (default 10) for S seconds (default 300) on the shared envtest (kube-apiserver + etcd),
# then what the replicas cost the API server, from the server's own counters
# (apiserver_request_total by resource and verb, apiserver_watch_events_total by kind),
# per replica per minute. The soak's verdict (one mint per period, no dead-token request,
# takeover within the lease + 2 s) is in its report folder.
#   scripts/kube-scale.sh [--replicas N] [--duration S]
set -euo pipefail
cd "$(dirname "$0")/.."
replicas=10
duration=300
while [ $# -gt 0 ]; do
  case "$1" in
    --replicas) replicas="$2"; shift 2 ;;
    --duration) duration="$2"; shift 2 ;;
    *) echo "usage: scripts/kube-scale.sh [--replicas N] [--duration S]" >&2; exit 2 ;;
  esac
done
envtest=../shared/envtest
[ -x "$envtest/setup.sh" ] || { echo "kube-scale: needs the shared envtest at $envtest" >&2; exit 1; }
KUBEBUILDER_ASSETS=$("$envtest/setup.sh")
export KUBEBUILDER_ASSETS PATH="$KUBEBUILDER_ASSETS:$PATH"
cargo build --release --quiet
work=$(mktemp -d /tmp/pat-kube-scale.XXXXXX)
trap '"$envtest/stop.sh" "$work/k8s" >/dev/null 2>&1 || true' EXIT
eval "$("$envtest/start.sh" "$work/k8s")"

# The API server's counters for what the replicas touch, as "key value" lines.
counters() {
  kubectl get --raw /metrics | awk '
    /^apiserver_request_total\{/ && /resource="(secrets|leases)"/ {
      match($0, /resource="[a-z]+"/); r = substr($0, RSTART + 10, RLENGTH - 11)
      match($0, /verb="[A-Z]+"/); v = substr($0, RSTART + 6, RLENGTH - 7)
      n[r " " v] += $NF
    }
    /^apiserver_watch_events_total\{/ && /kind="(Secret|Lease)"/ {
      match($0, /kind="[A-Za-z]+"/); k = substr($0, RSTART + 6, RLENGTH - 7)
      n["watch-events " k] += $NF
    }
    END { for (k in n) print k, n[k] }' | sort
}
counters > "$work/before"
target/release/pat-rotator soak --store kubernetes --rotators "$replicas" --duration "$duration" \
  --out "$work/report" | tee "$work/soak.log"
counters > "$work/after"
echo
echo "## API-server requests per replica per minute ($replicas replicas, ${duration} s)"
echo
echo "| resource | verb | total | per replica per minute |"
echo "| --- | --- | --- | --- |"
join -a2 -e 0 -o '0,1.2,2.2' <(awk '{print $1"/"$2, $3}' "$work/before") <(awk '{print $1"/"$2, $3}' "$work/after") |
  awk -v r="$replicas" -v d="$duration" '{
    split($1, kv, "/"); total = $3 - $2
    if (total > 0) printf "| %s | %s | %d | %.2f |\n", kv[1], kv[2], total, total / r / (d / 60)
  }'
echo
echo "report: $work/report"
