#!/usr/bin/env bash
# Usage: bench/run.sh [--smoke]
#
# ldapsync's benchmarks (`make bench`), side by side in one run, same box,
# same clients, same data:
#
#   targets   slapd          the benchmark slapd, directly (the physical limit)
#             haproxy-tcp    HAProxy in TCP mode relaying to it: a byte pump that
#                            parses no LDAP, the limit of any relay on this box
#             ldapsync       ldapsync relaying to it (no connector)
#             ldapsync-mux   ldapsync with a multiplexed listener (sessions share
#                            a few directory connections, RFC 4370 identities)
#             ldapsync-st    ldapsync with sessions on session threads, one per
#                            core (proxy.session_threads; searches and ldclt)
#             ldapsync+cap   ldapsync relaying to it with a connector (capture on)
#             back-ldap      a second slapd, back_ldap pointing at the first
#             back-asyncmeta a third slapd, back_asyncmeta pointing at the first
#   data      bench/gen-data.sh: 100,000 people + 1,000 groups, slapadd -q
#             (kept in .run/bench/slapd between runs)
#   load      bench/ (ldapsync-bench, Rust/tokio, HDR histograms) and ldclt
#             (389-ds-base) for an independent search rate
#   rounds    searches at 32 and 256 connections and ldclt run BENCH_ROUNDS
#             (3) interleaved rounds for slapd, HAProxy and ldapsync's three
#             relays; the report takes medians (of each round's ratio to
#             HAProxy for issue 21's goals)
#
# Prints a table (absolute figures and ratios to direct slapd, the issue's
# goals) and writes bench/results/latest.json and bench/results/latest.svg.
#
# --smoke: 2,000 people, one-second scenarios, a few hundred idle connections,
# a storm of 200 clients, ldclt against ldapsync only; results in
# bench/results/smoke.json. For CI: it checks that everything runs, the
# figures mean little.
#
# Needs slapd, slapadd, ldapsearch (slapd, ldap-utils), ldclt (389-ds-base),
# haproxy, python3 and cargo; `make bench` installs the packages.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
top=$(dirname "$here")
smoke=0
for arg in "$@"; do
    case $arg in
        --smoke) smoke=1 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "run.sh: unknown argument $arg" >&2; exit 2 ;;
    esac
done

if ((smoke)); then
    PEOPLE=2000 NGROUPS=20 SECS=1 LAT_OPS=1000 CAP_OPS=30 IDLE=300 IDLE_BIND=100 STORM=200
    LDCLT_TARGETS="ldapsync" LDCLT_THREADS="8" RECON=0 FAILOVERS=1 ROUNDS=1 name=smoke
else
    PEOPLE=${BENCH_PEOPLE:-100000} NGROUPS=${BENCH_GROUPS:-1000} SECS=${BENCH_SECS:-8}
    LAT_OPS=20000 CAP_OPS=500 IDLE=10000 IDLE_BIND=5000 STORM=1000
    LDCLT_TARGETS="slapd haproxy-tcp ldapsync ldapsync-mux ldapsync-st back-ldap back-asyncmeta" LDCLT_THREADS="32 256"
    RECON=1 FAILOVERS=10 ROUNDS=${BENCH_ROUNDS:-3} name=latest
fi
# Each needs one descriptor per connection (two for ldapsync with upstream,
# and for a storm's clients through any relay).
limit=$(ulimit -n)
if ((IDLE > limit - 200)); then IDLE=$((limit - 200)); fi
if ((IDLE_BIND * 2 > limit - 200)); then IDLE_BIND=$(((limit - 200) / 2)); fi
if ((STORM * 2 > limit - 200)); then STORM=$(((limit - 200) / 2)); fi
# HAProxy refuses to start when maxconn needs more descriptors than it may
# open, two per relayed connection and a few of its own.
HAPROXY_MAXCONN=$(((limit - 200) / 2))

source "$here/tools.sh"
require_tools run.sh "make bench installs slapd, ldap-utils, 389-ds-base and haproxy" \
    slapd slapadd ldapsearch ldclt haproxy python3 cargo
SLAPD=$(tool_path slapd)
SLAPADD=$(tool_path slapadd)
HAPROXY=$(tool_path haproxy)

say() { printf '[bench %s] %s\n' "$(date +%T)" "$*" >&2; }

say "building ldapsync and the load generator (release)"
(cd "$top" && cargo build --release --quiet --bin ldapsync)
(cd "$here" && cargo build --release --quiet)
LDAPSYNC=$top/target/release/ldapsync
BENCH=$top/target/release/ldapsync-bench

run=$top/.run/bench
data=$run/slapd-$PEOPLE
work=$run/work
say "data: $PEOPLE people, $NGROUPS groups (slapadd -q into $data)"
"$here/slapd-data.sh" "$data" "$PEOPLE" "$NGROUPS"
rm -rf "$work"
mkdir -p "$work" "$here/results"
results=$work/results.jsonl
: > "$results"

# Free loopback ports below the ephemeral range (so clients never take them).
used=" $(ss -Hltn 2>/dev/null | awk '{ n = split($4, a, ":"); printf "%s ", a[n] }' || true) "
next_port=$((20000 + RANDOM % 10000))
free_port() {
    while [[ $used == *" $next_port "* ]]; do next_port=$((next_port + 1)); done
    port=$next_port
    next_port=$((next_port + 1))
}

pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

wait_ldap() { # URL PID WHAT
    for _ in $(seq 200); do
        ldapsearch -x -H "$1" -b "" -s base -LLL dn >/dev/null 2>&1 && return 0
        kill -0 "$2" 2>/dev/null || { echo "run.sh: $3 did not start; see $work" >&2; exit 1; }
        sleep 0.1
    done
    echo "run.sh: $3 does not answer on $1" >&2
    exit 1
}

declare -A URL PID
# EXTRA listeners more: URL[NAME-2], URL[NAME-3], … reach the same slapd.
start_slapd() { # NAME CONFIG_DIR [EXTRA]
    free_port
    URL[$1]=ldap://127.0.0.1:$port
    local listen="${URL[$1]}/"
    for n in $(seq 2 $((${3:-0} + 1))); do
        free_port
        URL[$1-$n]=ldap://127.0.0.1:$port
        listen="$listen ${URL[$1-$n]}/"
    done
    "$SLAPD" -d none -F "$2" -h "$listen" >"$work/$1.log" 2>&1 &
    PID[$1]=$!
    pids+=("${PID[$1]}")
    wait_ldap "${URL[$1]}" "${PID[$1]}" "$1"
}

proxy_slapd() { # NAME TEMPLATE
    local dir=$work/$1
    mkdir -p "$dir/slapd.d"
    sed -e "s|@DIR@|$dir|g" -e "s|@UPSTREAM@|${URL[slapd]}|g" "$here/$2" >"$dir/config.ldif"
    "$SLAPADD" -n0 -F "$dir/slapd.d" -l "$dir/config.ldif" >"$dir/slapadd.log" 2>&1 ||
        { cat "$dir/slapadd.log" >&2; exit 1; }
    start_slapd "$1" "$dir/slapd.d"
}

# A throw-away PostgreSQL for the shared-store scenarios (initdb refuses
# root: then it runs as Debian's postgres user), fsync off like the bench
# slapd's. Sets PG_URL's base; each scenario creates its own database.
PG_BIN=/usr/lib/postgresql/15/bin
as_pg() { if [ "$(id -u)" = 0 ]; then setpriv --reuid=postgres --regid=postgres --clear-groups -- "$@"; else "$@"; fi; }
start_postgres() {
    free_port
    PG_PORT=$port
    local dir=$work/postgres
    mkdir -p "$dir"
    [ "$(id -u)" = 0 ] && chown postgres: "$dir"
    as_pg "$PG_BIN/initdb" --no-sync -A trust -U ldapsync -D "$dir/data" >"$work/initdb.log" 2>&1 ||
        { cat "$work/initdb.log" >&2; exit 1; }
    as_pg "$PG_BIN/postgres" -D "$dir/data" -h 127.0.0.1 -p "$PG_PORT" -k "" -F -c max_connections=200 \
        >"$work/postgres.log" 2>&1 &
    PID[postgres]=$!
    pids+=("${PID[postgres]}")
    for _ in $(seq 200); do "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" && return 0; sleep 0.1; done
    echo "run.sh: PostgreSQL did not start; see $work/postgres.log" >&2
    exit 1
}
pg_db() { # NAME: creates database NAME; prints its URL
    psql -h 127.0.0.1 -p "$PG_PORT" -U ldapsync -d postgres -qc "CREATE DATABASE \"$1\"" >/dev/null
    echo "postgresql://ldapsync@127.0.0.1:$PG_PORT/$1"
}
pg_sql() { # DB SQL
    psql -h 127.0.0.1 -p "$PG_PORT" -U ldapsync -d "$1" -XAtqc "$2"
}

# ldapsync's configuration: high connection limits for the idle scenario;
# CONNECTOR=1 adds a connector over user000001…user000999 (capture on);
# STORE, when given, is a PostgreSQL URL for [store] instead of SQLite.
# UPSTREAMS, when set, replaces the directory URL list (TOML strings);
# PROXY_LINES are added to [proxy], TOML_LINES to the end of the file.
start_ldapsync() { # NAME CONNECTOR [STORE [EXTRA_STORE_LINES]]
    free_port
    URL[$1]=ldap://127.0.0.1:$port
    local upstreams="\"${URL[slapd]}\""
    [[ -n ${UPSTREAMS:-} ]] && upstreams=$UPSTREAMS
    local dir=$work/$1
    mkdir -p "$dir"
    echo secret >"$dir/service.secret"
    chmod 600 "$dir/service.secret"
    local listen="\"${URL[$1]}\""
    if [[ -n ${MULTIPLEXED:-} ]]; then
        echo mux-secret >"$dir/multiplex.secret"
        chmod 600 "$dir/multiplex.secret"
        listen="{ url = \"${URL[$1]}\", mode = \"multiplexed\" }"
    fi
    cat >"$dir/ldapsync.toml" <<TOML
[proxy]
listen = [$listen]
upstream = [$upstreams]
${PROXY_LINES:-}
max_connections = 30000
max_connections_per_address = 30000

[log]
level = "warn"

TOML
    if [[ -n ${MULTIPLEXED:-} ]]; then
        printf '[proxy.multiplex]\nbind_dn = "cn=ldapsync,dc=example,dc=com"\npassword_file = "%s/multiplex.secret"\n\n' "$dir" >>"$dir/ldapsync.toml"
    fi
    if [[ -n ${3:-} ]]; then
        printf '[store]\nurl = "%s"\nadmin_socket = "%s/ldapsync.sock"\n%s\n' "$3" "$dir" "${4:-}" >>"$dir/ldapsync.toml"
    else
        printf '[store]\npath = "%s/ldapsync.db"\n' "$dir" >>"$dir/ldapsync.toml"
    fi
    if [[ $2 == 1 ]]; then
        cat >>"$dir/ldapsync.toml" <<TOML

[[connector]]
name = "bench"
bind_dn = "cn=admin,dc=example,dc=com"
password_file = "$dir/service.secret"
direction = "ldap-to-local"
poll_interval = "1h"

[connector.accounts]
base = "ou=bulk,dc=example,dc=com"
filter = "(&(objectClass=inetOrgPerson)(uid=user000*))"
naming = "uid"
map = { cn = "display_name", mail = "mail", description = "description" }
object_classes = ["inetOrgPerson"]
TOML
    fi
    [[ -n ${TOML_LINES:-} ]] && printf '%s\n' "$TOML_LINES" >>"$dir/ldapsync.toml"
    "$LDAPSYNC" serve --config "$dir/ldapsync.toml" >"$dir/ldapsync.log" 2>&1 &
    PID[$1]=$!
    pids+=("${PID[$1]}")
    wait_ldap "${URL[$1]}" "${PID[$1]}" "$1"
}

# HAProxy with its defaults (one thread per core, no logging), in the
# foreground (-db) so that its pid is the process that relays and is
# measured. The listen backlog follows maxconn (the kernel caps it at
# net.core.somaxconn).
start_haproxy() { # NAME
    free_port
    URL[$1]=ldap://127.0.0.1:$port
    local dir=$work/$1
    mkdir -p "$dir"
    cat >"$dir/haproxy.cfg" <<CFG
global
    maxconn $HAPROXY_MAXCONN

defaults
    mode tcp
    maxconn $HAPROXY_MAXCONN
    timeout connect 10s
    timeout client 10m
    timeout server 10m

listen ldap
    bind 127.0.0.1:$port
    server slapd ${URL[slapd]#ldap://}
CFG
    "$HAPROXY" -db -f "$dir/haproxy.cfg" >"$dir/haproxy.log" 2>&1 &
    PID[$1]=$!
    pids+=("${PID[$1]}")
    wait_ldap "${URL[$1]}" "${PID[$1]}" "$1"
}

say "starting slapd, haproxy-tcp, ldapsync (relay), ldapsync (capture, SQLite and PostgreSQL), back-ldap, back-asyncmeta"
start_slapd slapd "$data/slapd.d" 2
start_postgres
start_haproxy haproxy-tcp
start_ldapsync ldapsync 0
MULTIPLEXED=1 start_ldapsync ldapsync-mux 0
PROXY_LINES="session_threads = $(nproc)" start_ldapsync ldapsync-st 0
start_ldapsync ldapsync+cap 1
capurl=$(pg_db capture)
start_ldapsync ldapsync+pg 1 "$capurl"
proxy_slapd back-ldap back-ldap.ldif.in
proxy_slapd back-asyncmeta back-asyncmeta.ldif.in
# The capture connector's first pass associates its 999 people.
capdb=$work/ldapsync+cap/ldapsync.db
for i in $(seq 600); do
    n=$(python3 -c 'import sqlite3,sys; print(sqlite3.connect("file:"+sys.argv[1]+"?mode=ro", uri=True).execute("select count(*) from objects").fetchone()[0])' "$capdb" 2>/dev/null || echo 0)
    ((n >= 999)) && break
    ((i == 600)) && { echo "run.sh: the capture connector's first sync did not finish (objects: $n)" >&2; exit 1; }
    sleep 0.1
done
for i in $(seq 600); do
    n=$(pg_sql capture "SELECT count(*) FROM objects" 2>/dev/null || echo 0)
    ((n >= 999)) && break
    ((i == 600)) && { echo "run.sh: the PostgreSQL capture connector's first sync did not finish (objects: $n)" >&2; exit 1; }
    sleep 0.1
done

bench() { # TARGET ARGS… : one scenario, its JSON tagged with the target (and ROUND)
    local target=$1
    shift
    local out
    if ! out=$("$BENCH" "$@" --url "${URL[$target]}" --users "$PEOPLE" 2>>"$work/bench.err"); then
        say "  $target $1: FAILED (see $work/bench.err)"
        echo "{\"target\":\"$target\",\"scenario\":\"$1\",\"failed\":true}" >>"$results"
        return 0
    fi
    printf '%s\n' "$out" | python3 -c 'import json,sys; d=json.load(sys.stdin); d["target"]=sys.argv[1]; d["round"]=int(sys.argv[2]); print(json.dumps(d))' "$target" "${ROUND:-1}" >>"$results"
}

proxies="slapd haproxy-tcp ldapsync ldapsync-mux back-ldap back-asyncmeta"
say "(a) search by uid, 1 connection, $LAT_OPS sequential operations"
for t in $proxies; do bench "$t" latency --ops "$LAT_OPS"; done
# Issue 21's yardsticks run in ROUNDS interleaved rounds (the report takes
# each round's ratio to HAProxy, then their median): on a shared box one
# sample of each moves by more than the differences it is to show. The
# other relays run in the first round only.
part1="slapd haproxy-tcp ldapsync ldapsync-mux ldapsync-st"
for ROUND in $(seq "$ROUNDS"); do
    for conns in 32 256; do
        say "(b) search by uid, $conns connections, ${SECS}s each (round $ROUND of $ROUNDS)"
        targets=$part1
        if ((ROUND == 1)); then targets="$proxies ldapsync-st"; fi
        for t in $targets; do
            cpu=(--cpu "slapd=${PID[slapd]}")
            [[ $t != slapd ]] && cpu+=(--cpu "proxy=${PID[$t]}")
            bench "$t" search --conns "$conns" --secs "$SECS" "${cpu[@]}"
        done
    done
done
ROUND=1
say "(b2) search by uid pipelined: 4 connections with 32 searches in flight each, ${SECS}s each"
for t in $proxies; do bench "$t" pipelined --conns 4 --depth 32 --secs "$SECS"; done
say "(c) connect + bind + search + unbind, 32 at once, ${SECS}s each"
for t in $proxies; do bench "$t" churn --conns 32 --secs "$SECS"; done
say "(c3) directory pool: connect + bind + search + unbind, one at a time, ${SECS}s each; ldapsync+pool has two directory URLs, the first black-holed"
# A full accept queue: SYNs to it go unanswered, as to a host that is down or filtered.
free_port
hole=$port
python3 - "$hole" <<'PY' &
import socket, sys, time
port = int(sys.argv[1])
s = socket.socket()
s.bind(("127.0.0.1", port))
s.listen(0)
held = []
while True:
    c = socket.socket()
    c.settimeout(0.2)
    try:
        c.connect(("127.0.0.1", port))
    except OSError:
        break
    held.append(c)
time.sleep(10**6)
PY
PID[hole]=$!
pids+=("${PID[hole]}")
sleep 1
UPSTREAMS="\"ldap://127.0.0.1:$hole\", \"${URL[slapd]}\"" start_ldapsync ldapsync+pool 0
# The first session finds the black hole (it waits the connect timeout);
# the sessions measured know it is down.
ldapsearch -x -H "${URL[ldapsync+pool]}" -b "" -s base >/dev/null 2>&1 || true
for t in ldapsync ldapsync+pool; do bench "$t" churn --conns 1 --secs "$SECS"; done
say "(c4) round-robin over three directory URLs (one slapd listening on three ports): connect + bind + search + unbind, 32 at once, ${SECS}s; sessions per URL"
free_port
rr_metrics=127.0.0.1:$port
UPSTREAMS="\"${URL[slapd]}\", \"${URL[slapd-2]}\", \"${URL[slapd-3]}\"" PROXY_LINES='balance = "round-robin"' \
    TOML_LINES=$'[metrics]\n'"listen = \"$rr_metrics\"" start_ldapsync ldapsync+rr 0
bench ldapsync+rr churn --conns 32 --secs "$SECS"
python3 - "$rr_metrics" >>"$results" <<'PY'
import json, re, sys, urllib.request
text = urllib.request.urlopen(f"http://{sys.argv[1]}/metrics").read().decode()
counts = [int(n) for n in re.findall(r'^ldapsync_upstream_sessions_started_total\{url="[^"]*"\} (\d+)$', text, re.M)]
print(json.dumps({"target": "ldapsync+rr", "scenario": "spread", "sessions": counts}))
PY
say "(c2) connection storm: $STORM clients released at once, each connect + anonymous bind + search + unbind"
for t in $proxies; do bench "$t" storm --conns "$STORM"; done
say "(d) modify (replace description) on 999 people, 8 connections, ${SECS}s each"
for t in slapd ldapsync ldapsync+cap ldapsync+pg back-ldap; do bench "$t" modify --conns 8 --secs "$SECS" --range 999; done
# The modifies left captures to apply; the next scenarios start when both
# connectors have applied them, or they would measure the backlog.
drain() {
    for _ in $(seq 1200); do
        local sq pg
        sq=$(python3 -c 'import sqlite3,sys; print(sqlite3.connect("file:"+sys.argv[1]+"?mode=ro", uri=True).execute("select count(*) from captures").fetchone()[0])' "$capdb" 2>/dev/null || echo 1)
        pg=$(pg_sql capture "SELECT count(*) FROM captures" 2>/dev/null || echo 1)
        ((sq == 0 && pg == 0)) && return 0
        sleep 0.1
    done
    say "  captures still pending after 120 s (SQLite $sq, PostgreSQL $pg)"
}
drain
say "(d2) search by uid, 32 connections, through ldapsync with its store on PostgreSQL"
bench ldapsync+pg search --conns 32 --secs "$SECS" --cpu "slapd=${PID[slapd]}" --cpu "proxy=${PID[ldapsync+pg]}"
drain
say "(e) capture latency: $CAP_OPS modifies through ldapsync until each is in the local store (SQLite, PostgreSQL)"
bench ldapsync+cap capture --db "$capdb" --ops "$CAP_OPS" --range 999
bench ldapsync+pg capture --db "$capurl" --ops "$CAP_OPS" --range 999

say "(e2) failover: kill -9 of the lease holder, then a write through the other instance, until it is in the store; $FAILOVERS runs"
fourl=$(pg_db failover)
start_ldapsync failover-a 1 "$fourl"
start_ldapsync failover-b 1 "$fourl"
for i in $(seq 600); do
    n=$(pg_sql failover "SELECT count(*) FROM objects" 2>/dev/null || echo 0)
    ((n >= 999)) && break
    sleep 0.1
done
for run in $(seq "$FAILOVERS"); do
    holder=$(pg_sql failover "SELECT split_part(holder, '/', 2) FROM leases WHERE expires_at > now()")
    if [[ $holder == "${PID[failover-a]}" ]]; then dead=failover-a alive=failover-b; else dead=failover-b alive=failover-a; fi
    value="failover-$run-$(date +%s%N)"
    t0=$(date +%s.%N)
    kill -9 "${PID[$dead]}"
    wait "${PID[$dead]}" 2>/dev/null || true
    printf 'dn: uid=user000001,ou=bulk,dc=example,dc=com\nchangetype: modify\nreplace: description\ndescription: %s\n' "$value" |
        ldapmodify -x -H "${URL[$alive]}" -D cn=admin,dc=example,dc=com -w secret >/dev/null
    secs=
    for _ in $(seq 1200); do
        if [[ $(pg_sql failover "SELECT count(*) FROM objects WHERE name = 'user000001' AND \"values\" LIKE '%$value%'") == 1 ]]; then
            secs=$(python3 -c "import sys; print(round($(date +%s.%N) - $t0, 3))")
            break
        fi
        sleep 0.05
    done
    if [[ -n $secs ]]; then
        echo "{\"target\":\"ldapsync+pg\",\"scenario\":\"failover\",\"run\":$run,\"secs\":$secs}" >>"$results"
    else
        say "  failover run $run: the write never reached the store"
        echo "{\"target\":\"ldapsync+pg\",\"scenario\":\"failover\",\"run\":$run,\"failed\":true}" >>"$results"
    fi
    # The killed one comes back as the standby of the next run.
    rm -rf "$work/$dead"
    start_ldapsync "$dead" 1 "$fourl"
done

# CPU time (user + system) of a process so far, in clock ticks.
ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
# µs per operation: TICKS of CPU over OPS operations.
per_op() { python3 -c "import sys; print(round(int(sys.argv[1]) * 1e6 / $(getconf CLK_TCK) / int(sys.argv[2]), 2))" "$1" "$2"; }

say "ldclt (389-ds-base): search by uid, $LDCLT_THREADS threads, one 10 s sample per target and count, $ROUNDS round(s)"
for round in $(seq "$ROUNDS"); do
    targets=
    for t in $LDCLT_TARGETS; do
        if ((round == 1)) || [[ " $part1 " == *" $t "* ]]; then targets+=" $t"; fi
    done
    for threads in $LDCLT_THREADS; do
        for t in $targets; do
            port=${URL[$t]##*:}
            # CPU per search, as ldapsync-bench's --cpu reports it: the
            # directory's, and the relay's for a relay.
            before=("$(ticks "${PID[slapd]}")" "$(ticks "${PID[$t]}")")
            out=$(cd "$work" && ldclt -h 127.0.0.1 -p "$port" -b ou=bulk,dc=example,dc=com \
                -e esearch,random -f uid=userXXXXXX -r 1 -R "$PEOPLE" -n "$threads" -N 1 -q 2>&1 || true)
            after=("$(ticks "${PID[slapd]}")" "$(ticks "${PID[$t]}")")
            printf '%s\n' "$out" >"$work/ldclt-$t-$threads-$round.log"
            # "Global average rate: 12195.88/thr  (39026.80/sec), total: 390268"
            # (ldclt pads the total: "total:  74020")
            rate=$(printf '%s\n' "$out" | sed -n 's/.*Global average rate: .*(\([0-9.]*\)\/sec), total: *\([0-9]*\).*/\1 \2/p' | tail -1)
            if [[ -z $rate ]]; then
                say "  $t: ldclt printed no rate (see $work/ldclt-$t-$threads-$round.log)"
                echo "{\"target\":\"$t\",\"scenario\":\"ldclt\",\"threads\":$threads,\"round\":$round,\"failed\":true}" >>"$results"
                continue
            fi
            set -- $rate
            cpu="\"slapd\":$(per_op $((after[0] - before[0])) "$2")"
            [[ $t != slapd ]] && cpu+=",\"proxy\":$(per_op $((after[1] - before[1])) "$2")"
            echo "{\"target\":\"$t\",\"scenario\":\"ldclt\",\"threads\":$threads,\"round\":$round,\"ops_per_s\":$1,\"ops\":$2,\"cpu_us_per_op\":{$cpu},\"clean\":$(grep -q 'Global no error' <<<"$out" && echo true || echo false)}" >>"$results"
        done
    done
done

# Idle connections last: fresh processes, so the RSS growth is the
# connections' and not the allocator's leftovers from the load above.
say "(f) idle connections: $IDLE on fresh instances (and $IDLE_BIND after an anonymous bind), RSS growth"
for t in ldapsync back-ldap; do kill "${PID[$t]}"; wait "${PID[$t]}" 2>/dev/null || true; done
start_ldapsync ldapsync 0
rm -rf "$work/back-ldap"
proxy_slapd back-ldap back-ldap.ldif.in
for t in slapd ldapsync back-ldap; do bench "$t" idle --conns "$IDLE" --pid "${PID[$t]}"; done
# Again on a fresh ldapsync: the first one's allocator keeps what the closed
# connections freed, which would hide the growth.
kill "${PID[ldapsync]}"
wait "${PID[ldapsync]}" 2>/dev/null || true
start_ldapsync ldapsync 0
bench ldapsync idle --conns "$IDLE_BIND" --pid "${PID[ldapsync]}" --bind

if ((RECON)); then
    say "(g) full reconciliation of all $PEOPLE people (ldapsync sync run --full): time and peak RSS"
    dir=$work/recon
    mkdir -p "$dir"
    echo secret >"$dir/service.secret"
    chmod 600 "$dir/service.secret"
    cat >"$dir/ldapsync.toml" <<TOML
[proxy]
listen = ["ldap://127.0.0.1:0"]
upstream = ["${URL[slapd]}"]

[log]
level = "warn"

[store]
path = "$dir/ldapsync.db"

[[connector]]
name = "all"
bind_dn = "cn=admin,dc=example,dc=com"
password_file = "$dir/service.secret"
direction = "ldap-to-local"

[connector.accounts]
base = "ou=bulk,dc=example,dc=com"
filter = "(objectClass=inetOrgPerson)"
naming = "uid"
map = { cn = "display_name", mail = "mail", description = "description" }
object_classes = ["inetOrgPerson"]
TOML
    for store in sqlite postgresql; do
    if [[ $store == postgresql ]]; then
        sed -i "s|^path = .*|url = \"$(pg_db recon)\"|" "$dir/ldapsync.toml"
    fi
    for pass in first again; do
        if timeout "${BENCH_RECON_TIMEOUT:-240}" /usr/bin/time -f 'elapsed=%e maxrss_kib=%M' -o "$dir/time-$pass" \
            "$LDAPSYNC" --config "$dir/ldapsync.toml" sync run --connector all --full >"$dir/$pass.out" 2>"$dir/$pass.err"; then
            read -r e m < <(sed -n 's/^elapsed=\([0-9.]*\) maxrss_kib=\([0-9]*\)/\1 \2/p' "$dir/time-$pass")
            echo "{\"target\":\"ldapsync\",\"scenario\":\"reconcile\",\"store\":\"$store\",\"pass\":\"$pass\",\"entries\":$PEOPLE,\"secs\":$e,\"peak_rss_kib\":$m}" >>"$results"
        else
            say "  reconciliation ($store, $pass) failed or timed out (see $dir)"
            echo "{\"target\":\"ldapsync\",\"scenario\":\"reconcile\",\"store\":\"$store\",\"pass\":\"$pass\",\"failed\":true}" >>"$results"
            break
        fi
    done
    done
    # The poll below runs on SQLite, as before.
    sed -i "s|^url = .*|path = \"$dir/ldapsync.db\"|" "$dir/ldapsync.toml"

    say "(h) poll: 1,000 people changed directly in slapd, then one incremental poll (sync run)"
    n=$((PEOPLE < 1000 ? PEOPLE : 1000))
    # New values every run: the data is kept between runs, and a value an
    # entry already holds is no change to apply.
    stamp=$(date +%s.%N)
    for i in $(seq 1 "$n"); do
        printf 'dn: uid=user%06d,ou=bulk,dc=example,dc=com\nchangetype: modify\nreplace: description\ndescription: polled %d at %s\n\n' "$i" "$i" "$stamp"
    done >"$dir/changes.ldif"
    ldapmodify -x -H "${URL[slapd]}" -D cn=admin,dc=example,dc=com -w secret -f "$dir/changes.ldif" >/dev/null
    if /usr/bin/time -f 'elapsed=%e maxrss_kib=%M' -o "$dir/time-poll" \
        "$LDAPSYNC" --config "$dir/ldapsync.toml" sync run --connector all >"$dir/poll.out" 2>"$dir/poll.err"; then
        read -r e m < <(sed -n 's/^elapsed=\([0-9.]*\) maxrss_kib=\([0-9]*\)/\1 \2/p' "$dir/time-poll")
        updated=$(sed -n 's/.* \([0-9]*\) updated,.*/\1/p' "$dir/poll.out")
        kind=$(head -1 "$dir/poll.out")
        echo "{\"target\":\"ldapsync\",\"scenario\":\"poll\",\"changes\":$n,\"updated\":${updated:-0},\"kind\":\"$kind\",\"secs\":$e}" >>"$results"
    else
        say "  poll failed (see $dir)"
        echo "{\"target\":\"ldapsync\",\"scenario\":\"poll\",\"failed\":true}" >>"$results"
    fi
fi

cleanup
trap - EXIT
machine="$(nproc) cores, $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo), $(uname -sr), $("$SLAPD" -VV 2>&1 | sed -n 's/.*\(slapd [0-9.]*\).*/\1/p' | head -1)"
python3 "$here/report.py" "$results" "$here/results/$name.json" "$here/results/$name.svg" \
    --people "$PEOPLE" --groups "$NGROUPS" --secs "$SECS" --rounds "$ROUNDS" --machine "$machine" $( ((smoke)) && echo --smoke)
