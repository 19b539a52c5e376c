#!/usr/bin/env bash
# Usage: bench/instructions.sh [CONNECTIONS [SECONDS]]
#
# User-space instructions and simulated cache misses per relayed search,
# ldapsync's release binary (sessions on the work-stealing runtime, then on
# two session threads) against HAProxy in TCP mode, each run under
# valgrind's callgrind (with its cache simulation) in turn: the relay's own
# work, counted exactly, which CPU time on a shared and noisy machine
# cannot show below a few per cent. Kernel time (the TCP stack,
# scheduling) is not counted here: `make bench` measures it.
#
# Same directory as `bench/run.sh --smoke` (2,000 people, kept in
# .run/bench), `ldapsync-bench search` as the load (anonymous searches by
# uid on CONNECTIONS connections, default 8, for SECONDS, default 5),
# after a warm-up on other connections. The profile covers the timed
# period only: its connections are open before it starts (their set-up,
# a session's first allocations, is not a search's cost). Prints per
# search each relay's instructions, first-level data write misses (D1mw)
# and last-level misses (DLmr + DLmw), and the functions with the most
# instructions and write misses of their own (bench/callgrind_top.py); the
# profiles stay in .run/bench/instructions/.
#
# Needs valgrind, slapd, haproxy and cargo: `make bench-instructions`
# installs them and runs it.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
top=$(dirname "$here")
conns=${1:-8}
secs=${2:-5}
source "$here/tools.sh"
require_tools instructions.sh "make bench-instructions installs them" \
    valgrind callgrind_control callgrind_annotate haproxy slapd ldapsearch python3 cargo
SLAPD=$(tool_path slapd)
HAPROXY=$(tool_path haproxy)

(cd "$top" && cargo build --release --quiet --bin ldapsync)
(cd "$here" && cargo build --release --quiet)
BENCH=$top/target/release/ldapsync-bench
data=$top/.run/bench/slapd-2000
"$here/slapd-data.sh" "$data" 2000 20
work=$(mktemp -d /tmp/ldapsync-instructions.XXXXXX)
kept=$top/.run/bench/instructions
rm -rf "$kept"
mkdir -p "$kept"
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"' EXIT

wait_ldap() {
    for _ in $(seq 300); do
        ldapsearch -x -H "$1" -b "" -s base -LLL dn >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    echo "instructions.sh: nothing answers on $1" >&2
    exit 1
}

"$SLAPD" -d none -F "$data/slapd.d" -h "ldap://127.0.0.1:24301/" >"$work/slapd.log" 2>&1 &
pids+=($!)
wait_ldap ldap://127.0.0.1:24301

cat >"$work/haproxy.cfg" <<CFG
global
    maxconn 1000
defaults
    mode tcp
    timeout connect 10s
    timeout client 10m
    timeout server 10m
listen ldap
    bind 127.0.0.1:24302
    server slapd 127.0.0.1:24301
CFG
cat >"$work/ldapsync.toml" <<CFG
[proxy]
listen = ["ldap://127.0.0.1:24302"]
upstream = ["ldap://127.0.0.1:24301"]
[log]
level = "warn"
[store]
path = "$work/store"
CFG

# The same relay with its sessions on two session threads (their own
# event loops), where tokio's per-wake-up machinery is not paid.
sed 's/^\[log\]/session_threads = 2\n[log]/' "$work/ldapsync.toml" >"$work/session-threads.toml"

for relay in haproxy-tcp ldapsync ldapsync-st; do
    case $relay in
        haproxy-tcp) command=("$HAPROXY" -db -f "$work/haproxy.cfg") ;;
        ldapsync) command=("$top/target/release/ldapsync" serve --config "$work/ldapsync.toml") ;;
        ldapsync-st) command=("$top/target/release/ldapsync" serve --config "$work/session-threads.toml") ;;
    esac
    out=$kept/$relay.callgrind
    valgrind --tool=callgrind --cache-sim=yes --callgrind-out-file="$out" "${command[@]}" >"$work/$relay.log" 2>&1 &
    pid=$!
    pids+=("$pid")
    wait_ldap ldap://127.0.0.1:24302
    "$BENCH" search --url ldap://127.0.0.1:24302 --users 2000 --conns "$conns" --secs 2 >/dev/null
    # A dump starts the count afresh: the first as the timed period begins,
    # the second (FILE.2) once its last search has ended.
    ops=$("$BENCH" search --url ldap://127.0.0.1:24302 --users 2000 --conns "$conns" --secs "$secs" \
        --at-edges "callgrind_control --dump $pid >/dev/null" |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["ops"])')
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    dump=$out.2
    python3 - "$dump" "$ops" "$relay" <<'PY'
import sys
dump, ops, relay = sys.argv[1], int(sys.argv[2]), sys.argv[3]
for line in open(dump):
    if line.startswith("events:"):
        events = line.split()[1:]
    if line.startswith("totals:") or line.startswith("summary:"):
        total = dict(zip(events, map(int, line.split()[1:])))
        break
print(f"{relay:<12} {ops:8d} searches; per search: {total['Ir'] / ops:6.0f} user instructions, "
      f"{total.get('D1mw', 0) / ops:5.1f} D1 write misses, {(total.get('DLmr', 0) + total.get('DLmw', 0)) / ops:5.2f} LL misses")
PY
    echo "  instructions, each function's own:"
    python3 "$here/callgrind_top.py" "$dump" "$ops" 12 Ir
    echo "  first-level data write misses, each function's own:"
    python3 "$here/callgrind_top.py" "$dump" "$ops" 8 D1mw
done
