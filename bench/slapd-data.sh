#!/usr/bin/env bash
# Usage: slapd-data.sh DIR [PEOPLE [GROUPS]]
#
# Builds (offline) the benchmark directory in DIR: cn=config rendered from
# fixtures/slapd/config.ldif.in the way fixtures/slapd-instance.sh does it
# (mdb with syncprov and accesslog, the fixture ACLs and indexes; the map size
# raised to 4 GiB for the bigger data), then gen-data.sh's LDIF bulk-loaded
# with `slapadd -q`. Start it with `slapd -F DIR/slapd.d -h URL`.
#
# A DIR built before with the same PEOPLE and GROUPS (DIR/stamp) is reused;
# the writes the benchmarks make there (descriptions) do not matter.
set -euo pipefail
DIR=$1
PEOPLE=${2:-100000}
NGROUPS=${3:-1000}
here=$(cd "$(dirname "$0")" && pwd)
SLAPADD=${SLAPADD:-$(command -v slapadd || echo /usr/sbin/slapadd)}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
stamp="people=$PEOPLE groups=$NGROUPS config=$(cksum < "$here/../fixtures/slapd/config.ldif.in" | cut -d' ' -f1) gen=$(cksum < "$here/gen-data.sh" | cut -d' ' -f1)"
if [[ -d $DIR/slapd.d && -f $DIR/stamp && $(cat "$DIR/stamp") == "$stamp" ]]; then
    exit 0
fi
rm -rf "$DIR/slapd.d" "$DIR/slapd.d.new" "$DIR/data" "$DIR/accesslog" "$DIR/stamp"
mkdir -p "$DIR/slapd.d.new" "$DIR/data" "$DIR/accesslog"
dir_re=$(printf '%s' "$DIR" | sed -e 's/[\\|&]/\\&/g')
sed -e "s|@DIR@|$dir_re|g" -e 's/^olcDbMaxSize: .*/olcDbMaxSize: 4294967296/' \
    "$here/../fixtures/slapd/config.ldif.in" > "$DIR/config.ldif"
"$SLAPADD" -n0 -F "$DIR/slapd.d.new" -l "$DIR/config.ldif" > "$DIR/slapadd.log" 2>&1 ||
    { cat "$DIR/slapadd.log" >&2; exit 1; }
"$here/gen-data.sh" "$PEOPLE" "$NGROUPS" > "$DIR/data.ldif"
"$SLAPADD" -q -w -F "$DIR/slapd.d.new" -b dc=example,dc=com -l "$DIR/data.ldif" >> "$DIR/slapadd.log" 2>&1 ||
    { cat "$DIR/slapadd.log" >&2; exit 1; }
rm -f "$DIR/data.ldif"
mv "$DIR/slapd.d.new" "$DIR/slapd.d"
echo "$stamp" > "$DIR/stamp"
