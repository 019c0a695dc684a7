#!/usr/bin/env bash
# The floor, measured against the tools that do the same job, in one run on this machine:
#
#   1. the authenticating proxy against nginx doing the same job (a reverse proxy that sets a
#      fixed Authorization header, worker_processes auto, upstream keep-alive) and against
#      calling the emulated workspace directly, at 1, 16 and 64 connections, interleaved
#      round by round so that a slow moment of the machine hits all three alike;
#   2. the metadata endpoint against the same process's /healthz, at 8 and 32 connections;
#   3. an idle rotator (lifetime 12 s, interval 8 s, no session) for 45 s, with its files on
#      the disk and again on a tmpfs: context switches per rotation (all threads, `perf
#      stat`, or /proc when perf is refused), fsync and fdatasync calls per rotation (perf's
#      syscall tracepoints), VmHWM, RssAnon and threads.
#
# Every figure is a ratio against a baseline measured in the same run. It installs wrk and
# nginx-light from Debian when they are missing (as root), builds the release binary, and
# cleans up every process it started. Usage: scripts/bench.sh [--rounds N] [--seconds S]
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=3
seconds=5
idle_seconds=45
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds="$2"; shift 2 ;;
    --seconds) seconds="$2"; shift 2 ;;
    --idle-seconds) idle_seconds="$2"; shift 2 ;;
    *) echo "usage: scripts/bench.sh [--rounds N] [--seconds S] [--idle-seconds S]" >&2; exit 2 ;;
  esac
done

need=()
command -v wrk >/dev/null || need+=(wrk)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v perf >/dev/null || need+=(linux-perf)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "bench: needs ${need[*]} (Debian packages); install them as root and run again" >&2
    exit 1
  fi
  echo "bench: installing ${need[*]} from Debian"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null \
    || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null; }
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

cargo build --release --quiet
BIN=$PWD/target/release/pat-rotator

work=$(mktemp -d /tmp/pat-bench.XXXXXX)
chmod 700 "$work"
pids=()
shm=""
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$work/nginx/nginx.pid" ] && kill "$(cat "$work/nginx/nginx.pid")" 2>/dev/null || true
  wait 2>/dev/null || true
  [ -n "${KEEP:-}" ] || rm -rf "$work" ${shm:+"$shm"}
}
trap cleanup EXIT

# A free loopback port, from the kernel.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

wait_for() { # url, what
  for _ in $(seq 1 200); do
    curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
    sleep 0.05
  done
  echo "bench: $2 did not come up ($1)" >&2
  exit 1
}

emu_port=$(free_port)
"$BIN" emulate --listen "127.0.0.1:$emu_port" --token-file "$work/bootstrap" >"$work/emulator.log" 2>&1 &
pids+=($!)
wait_for "http://127.0.0.1:$emu_port/emulator/counters" "the emulator"
HOST=http://127.0.0.1:$emu_port

# A rotator with a lifetime long enough that nothing rotates during the load.
pub_port=$(free_port); ctl_port=$(free_port); proxy_port=$(free_port)
rotator() { # config-file lifetime interval listen control proxy(or -) command... (in a subshell: it execs)
  local cfg=$1 lifetime=$2 interval=$3 listen=$4 control=$5 proxy=$6; shift 6
  exec env -i PATH="$PATH" HOME="$work" DATABRICKS_HOST="$HOST" DATABRICKS_CONFIG_FILE="$cfg" \
    DATABRICKS_TOKEN="$(cat "$work/bootstrap")" PAT_TOKEN_LIFETIME="$lifetime" \
    PAT_ROTATION_INTERVAL="$interval" PAT_REVOKE_GRACE=2 PAT_LISTEN="$listen" \
    PAT_CONTROL_LISTEN="$control" $([ "$proxy" = - ] || echo PAT_PROXY_LISTEN="$proxy") \
    RUST_LOG=warn "$BIN" "$@"
}
loaded() { rotator "$work/loaded.cfg" 3600 3000 "127.0.0.1:$pub_port" "127.0.0.1:$ctl_port" "127.0.0.1:$proxy_port" "$@"; }
loaded run >"$work/rotator.log" 2>&1 &
pids+=($!)
wait_for "http://127.0.0.1:$pub_port/readyz" "the rotator"
status=$(loaded status --json)
proxy_url=$(printf '%s' "$status" | python3 -c 'import json,sys; print(json.load(sys.stdin)["proxy_url"])')
metadata_url=$(printf '%s' "$status" | python3 -c 'import json,sys; print(json.load(sys.stdin)["metadata_url"])')
token=$(loaded token)

# nginx doing the proxy's job with the same (fixed) token.
nginx_port=$(free_port)
mkdir -p "$work/nginx/logs"
cat >"$work/nginx/nginx.conf" <<EOF
worker_processes auto;
pid $work/nginx/nginx.pid;
error_log $work/nginx/logs/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $work/nginx/body;
  proxy_temp_path $work/nginx/proxy;
  upstream workspace { server 127.0.0.1:$emu_port; keepalive 128; }
  server {
    listen 127.0.0.1:$nginx_port;
    location / {
      proxy_pass http://workspace;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer $token";
      proxy_buffering off;
    }
  }
}
EOF
"$NGINX" -c "$work/nginx/nginx.conf" -p "$work/nginx" -e "$work/nginx/logs/error.log"
wait_for "http://127.0.0.1:$nginx_port/api/2.0/preview/scim/v2/Me" "nginx"

PATH_ME=api/2.0/preview/scim/v2/Me
# wrk's requests/s and p50 (in µs) for one run: "rps p50_us".
wrk_run() { # connections, url, extra wrk args...
  local c=$1 url=$2; shift 2
  local t=$(( c < 2 ? 1 : 2 ))
  wrk -t"$t" -c"$c" -d"${seconds}s" --latency "$@" "$url" | awk '
    function us(v) { if (v ~ /us$/) return v+0; if (v ~ /ms$/) return (v+0)*1000; if (v ~ /s$/) return (v+0)*1000000; return v }
    /Requests\/sec/ { rps=$2 }
    /^ +50%/ { p50=us($2) }
    /Non-2xx/ { bad=$NF }
    END { if (bad > 0) { print "bench: non-2xx answers" > "/dev/stderr"; exit 1 } print rps, p50 }'
}

declare -A rps p50
add() { # key, "rps p50"
  rps[$1]="${rps[$1]:-} ${2% *}"
  p50[$1]="${p50[$1]:-} ${2#* }"
}
echo "bench: $rounds rounds of ${seconds}s per cell, interleaved"
for round in $(seq 1 "$rounds"); do
  for c in 1 16 64; do
    add "direct $c" "$(wrk_run "$c" "$HOST/$PATH_ME" -H "Authorization: Bearer $token")"
    add "nginx $c" "$(wrk_run "$c" "http://127.0.0.1:$nginx_port/$PATH_ME")"
    add "proxy $c" "$(wrk_run "$c" "${proxy_url}$PATH_ME")"
  done
  for c in 8 32; do
    add "healthz $c" "$(wrk_run "$c" "http://127.0.0.1:$pub_port/healthz")"
    add "metadata $c" "$(wrk_run "$c" "$metadata_url" -H "X-Databricks-Metadata-Version: 1" -H "X-Databricks-Host: $HOST")"
  done
  echo "bench: round $round done"
done

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }

echo
echo "## proxy and nginx against direct calls (GET /$PATH_ME, median of $rounds rounds)"
echo
echo "| connections | requests/s direct / nginx / proxy | proxy / nginx requests/s | p50 µs direct / nginx / proxy | proxy / nginx p50 |"
echo "| --- | --- | --- | --- | --- |"
for c in 1 16 64; do
  d=$(echo "${rps[direct $c]}" | median); n=$(echo "${rps[nginx $c]}" | median); p=$(echo "${rps[proxy $c]}" | median)
  dl=$(echo "${p50[direct $c]}" | median); nl=$(echo "${p50[nginx $c]}" | median); pl=$(echo "${p50[proxy $c]}" | median)
  echo "| $c | ${d%.*} / ${n%.*} / ${p%.*} | $(ratio "$p" "$n")x | $dl / $nl / $pl | $(ratio "$pl" "$nl")x |"
done
echo
echo "## metadata endpoint against /healthz (same process, median of $rounds rounds)"
echo
echo "| connections | requests/s healthz / metadata | metadata / healthz |"
echo "| --- | --- | --- |"
for c in 8 32; do
  h=$(echo "${rps[healthz $c]}" | median); m=$(echo "${rps[metadata $c]}" | median)
  echo "| $c | ${h%.*} / ${m%.*} | $(ratio "$m" "$h")x |"
done

# The idle rotator, twice: with its files on this machine's disk, and on a tmpfs where fsync
# costs nothing. The difference is what the durable writes cost on this disk (three temp
# files, fsyncs and renames per rotation); the tmpfs row is the process's own cost. Each run
# has its own files and ports; the loaded rotator keeps running but idle.
idle_rows=()
idle_run() { # label directory
  local label=$1 dir=$2 idle_pub idle_ctl idle_pid r0 r1 switches how hwm anon threads n per syncs sync_per
  idle_pub=$(free_port); idle_ctl=$(free_port)
  rotator "$dir/idle.cfg" 12 8 "127.0.0.1:$idle_pub" "127.0.0.1:$idle_ctl" - run >"$work/idle-$label.log" 2>&1 &
  idle_pid=$!
  pids+=($idle_pid)
  wait_for "http://127.0.0.1:$idle_pub/readyz" "the idle rotator ($label)"
  rotations() { curl -fsS "http://127.0.0.1:$idle_pub/metrics" | awk '/^pat_rotator_rotations_total/ { s += $NF } END { print s+0 }'; }
  r0=$(rotations)
  syncs=""
  # fsync and fdatasync counted by the kernel's syscall tracepoints, where perf may read them.
  if perf stat -e context-switches,syscalls:sys_enter_fsync,syscalls:sys_enter_fdatasync -x, -o "$work/perf.csv" -p "$idle_pid" -- sleep "$idle_seconds" 2>/dev/null; then
    switches=$(awk -F, '/context-switches/ { print $1 }' "$work/perf.csv")
    syncs=$(awk -F, '/sys_enter_f(data)?sync/ { s += $1 } END { print s+0 }' "$work/perf.csv")
    how="perf stat"
  elif perf stat -e context-switches -x, -o "$work/perf.csv" -p "$idle_pid" -- sleep "$idle_seconds" 2>/dev/null; then
    switches=$(awk -F, '/context-switches/ { print $1 }' "$work/perf.csv")
    how="perf stat"
  else
    # Without perf: the sum over the threads alive at both ends (threads that came and went
    # are missed, so this is a floor).
    sum_ctx() { cat /proc/"$idle_pid"/task/*/status 2>/dev/null | awk '/ctxt_switches/ { s += $2 } END { print s+0 }'; }
    local s0; s0=$(sum_ctx); sleep "$idle_seconds"; switches=$(( $(sum_ctx) - s0 ))
    how="/proc, a floor"
  fi
  r1=$(rotations)
  hwm=$(awk '/VmHWM/ { print $2 }' /proc/"$idle_pid"/status)
  anon=$(awk '/RssAnon/ { print $2 }' /proc/"$idle_pid"/status)
  threads=$(awk '/Threads/ { print $2 }' /proc/"$idle_pid"/status)
  kill "$idle_pid" 2>/dev/null || true
  n=$(( r1 - r0 ))
  per=$( [ "$n" -gt 0 ] && ratio "$switches" "$n" || echo "n/a")
  sync_per=$( [ "$n" -gt 0 ] && [ -n "$syncs" ] && ratio "$syncs" "$n" || echo "n/a (no syscall tracepoints)")
  mib() { echo "$(( $1 / 1024 )).$(( ($1 % 1024) * 10 / 1024 )) MiB"; }
  idle_rows+=("| $label | $n | $switches ($how) | $per | $sync_per | $(mib "$hwm") | $(mib "$anon") | $threads |")
}
idle_run "disk ($(df --output=fstype "$work" | tail -1 | tr -d ' '))" "$work"
if shm=$(mktemp -d /dev/shm/pat-bench.XXXXXX 2>/dev/null); then
  idle_run "tmpfs" "$shm"
  rm -rf "$shm"
else
  idle_rows+=("| tmpfs | not measured: /dev/shm is not writable here | | | | | | |")
fi
echo
echo "## idle rotator (lifetime 12 s, interval 8 s, no session, ${idle_seconds} s each)"
echo
echo "VmHWM counts the executable's pages the process touched (shared by every process running"
echo "the same binary); RssAnon is the process's own memory (heap and stacks)."
echo
echo "| files on | rotations | context switches (all threads) | per rotation | fsyncs per rotation | VmHWM | RssAnon | threads |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- |"
printf '%s\n' "${idle_rows[@]}"
