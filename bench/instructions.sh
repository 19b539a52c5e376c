#!/usr/bin/env bash
# Usage: bench/instructions.sh [CONNECTIONS [SECONDS]]
#
# User-space instructions per relayed search, ldapsync's release binary
# (sessions on the work-stealing runtime, then on two session threads)
# against HAProxy in TCP mode, each run under valgrind's callgrind in turn:
# the relay's own work, counted exactly, which CPU time on a shared and
# noisy machine cannot show below a few per cent. Kernel time (the TCP
# stack, scheduling) is not counted here: `make bench` measures it.
#
# Same directory as `bench/run.sh --smoke` (2,000 people, kept in
# .run/bench), `ldapsync-bench search` as the load (anonymous searches by
# uid on CONNECTIONS connections, default 8, for SECONDS, default 5),
# counted from after a warm-up. Prints each relay's instructions per search
# and the twelve functions with the most of their own
# (bench/callgrind_top.py); the profiles stay in .run/bench/instructions/.
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
    valgrind --tool=callgrind --callgrind-out-file="$out" "${command[@]}" >"$work/$relay.log" 2>&1 &
    pid=$!
    pids+=("$pid")
    wait_ldap ldap://127.0.0.1:24302
    "$BENCH" search --url ldap://127.0.0.1:24302 --users 2000 --conns "$conns" --secs 2 >/dev/null
    # A dump starts the count afresh: what follows is the measured run only.
    callgrind_control --dump "$pid" >/dev/null 2>&1
    ops=$("$BENCH" search --url ldap://127.0.0.1:24302 --users 2000 --conns "$conns" --secs "$secs" |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["ops"])')
    callgrind_control --dump "$pid" >/dev/null 2>&1
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    # The second dump (FILE.2): the measured run.
    dump=$out.2
    total=$(callgrind_annotate "$dump" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }')
    printf '%-12s %8d searches  %6d user instructions per search; the most, each its own:\n' "$relay" "$ops" $((total / ops))
    python3 "$here/callgrind_top.py" "$dump" "$ops" 12
done
