#!/usr/bin/env bash
# The cluster store at scale, on a real API server: `soak --store kubernetes` with N replicas
# (default 10) for S seconds (default 300) on the shared envtest (kube-apiserver + etcd),
# then what the replicas cost the API server:
# - from the server's own counters (apiserver_request_total by resource and verb,
#   apiserver_watch_events_total by kind) over the whole run, the soak's own requests taken
#   out, per replica per minute;
# - from each replica's own count (pat_rotator_kube_requests_total, by whether it held the
#   Lease), in the steady-state window (one lifetime in until the stop: no start-up, no
#   shutdown), per replica per minute outside the lease holder: the figure that grows with
#   the fleet.
# By default nothing changes but the token (no provider faults, no kills, no API-server cut:
# the steady state); --faults keeps the soak's kills and cut. The soak's verdict (one mint
# per period, no dead-token request, takeover within the lease + 2 s) is in its report folder.
#   scripts/kube-scale.sh [--replicas N] [--duration S] [--faults]
set -euo pipefail
cd "$(dirname "$0")/.."
replicas=10
duration=300
steady=(--no-faults --kill-every 0)
while [ $# -gt 0 ]; do
  case "$1" in
    --replicas) replicas="$2"; shift 2 ;;
    --duration) duration="$2"; shift 2 ;;
    --faults) steady=(); shift ;;
    *) echo "usage: scripts/kube-scale.sh [--replicas N] [--duration S] [--faults]" >&2; exit 2 ;;
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
  "${steady[@]}" --out "$work/report" | tee "$work/soak.log"
counters > "$work/after"
# The soak's own requests (its view of the Lease holder, the Secret's state), from its report.
python3 - "$work/report/report.json" > "$work/own" <<'PY'
import json, sys
f = json.load(open(sys.argv[1]))["figures"]
for k, n in f.get("kube_requests", {}).items():
    who, resource, verb = k.split()
    if who == "soak":
        print(f"{resource}/{verb.upper()}", n)
PY
echo
echo "## API-server requests per replica per minute ($replicas replicas, ${duration} s, the server's counters)"
echo
echo "Whole run, start-up and shutdown included, the soak's own requests taken out."
echo
echo "| resource | verb | total | per replica per minute |"
echo "| --- | --- | --- | --- |"
join -a2 -e 0 -o '0,1.2,2.2' <(awk '{print $1"/"$2, $3}' "$work/before") <(awk '{print $1"/"$2, $3}' "$work/after") |
  join -a1 -e 0 -o '0,1.2,1.3,2.2' - <(sort "$work/own") |
  awk -v r="$replicas" -v d="$duration" '{
    split($1, kv, "/"); total = $3 - $2 - $4
    if (total > 0) printf "| %s | %s | %d | %.2f |\n", kv[1], kv[2], total, total / r / (d / 60)
  }'
echo
echo "## Per replica per minute outside the lease holder (the replicas' own counts)"
echo
python3 - "$work/report/report.json" "$replicas" <<'PY'
import json, sys
f = json.load(open(sys.argv[1]))["figures"]
replicas, minutes = int(sys.argv[2]), f.get("kube_steady_minutes", 0)
window = f.get("kube_steady_requests", {})
print(f"Steady-state window: {minutes:.1f} min (one lifetime in until the stop).")
print()
print("| role | resource | verb | requests | per replica per minute |")
print("| --- | --- | --- | --- | --- |")
for k, n in sorted(window.items()):
    role, resource, verb = k.split()
    per = n / minutes if role == "holder" else n / max(replicas - 1, 1) / minutes
    if n:
        print(f"| {role} | {resource} | {verb} | {n} | {per:.2f} |")
per = f.get("kube_requests_per_replica_minute")
print()
print(f"Outside the holder: {per:.2f} requests per replica per minute." if per is not None else "No steady-state window (the run was shorter than a lifetime).")
PY
echo
echo "report: $work/report"
