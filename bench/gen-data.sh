#!/usr/bin/env bash
# Usage: gen-data.sh [PEOPLE [GROUPS]] > data.ldif
#
# The benchmark directory: fixtures/data/example.ldif (dc=example,dc=com,
# ou=people, ou=groups, ou=bulk, the six fixture people) plus PEOPLE generated
# people (default 100000) under ou=bulk and GROUPS groupOfNames (default 1000)
# under ou=bulkgroups, each with PEOPLE/GROUPS members. Deterministic.
#
#   uid=user000001,ou=bulk,dc=example,dc=com   password "bulk-secret"
#   cn=group0001,ou=bulkgroups,dc=example,dc=com
#   cn=ldapsync,dc=example,dc=com   password "mux-secret", may assert any
#                                   identity (a multiplexed listener's)
set -euo pipefail
PEOPLE=${1:-100000}
NGROUPS=${2:-1000}
here=$(cd "$(dirname "$0")" && pwd)

cat "$here/../fixtures/data/example.ldif"
awk -v people="$PEOPLE" -v groups="$NGROUPS" 'BEGIN {
    base = "dc=example,dc=com"
    printf "\ndn: ou=bulkgroups,%s\nobjectClass: organizationalUnit\nou: bulkgroups\n", base
    printf "\ndn: cn=ldapsync,%s\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\n", base
    printf "cn: ldapsync\nuserPassword: mux-secret\nauthzTo: {0}dn.regex:.*\n"
    split("Anna Ben Chloe David Emma Felix Grace Hugo Iris Jonas Kim Lea Max Nina Omar Paula", given, " ")
    split("Smith Muller Rossi Dubois Novak Silva Jensen Kowalski Garcia Berg Costa Weber", family, " ")
    for (i = 1; i <= people; i++) {
        id = sprintf("%06d", i)
        g = given[(i % 16) + 1]; f = family[(int(i / 16) % 12) + 1]
        printf "\ndn: uid=user%s,ou=bulk,%s\n", id, base
        print "objectClass: inetOrgPerson"
        printf "uid: user%s\ncn: %s %s %s\nsn: %s\ngivenName: %s\n", id, g, f, id, f, g
        printf "mail: user%s@example.com\ntelephoneNumber: +1 555 %07d\n", id, i
        printf "employeeNumber: %d\ndepartmentNumber: %d\n", i, i % 50
        print "userPassword: bulk-secret"
    }
    per = (groups > 0) ? int(people / groups) : 0
    if (per < 1) per = 1
    for (g = 1; g <= groups; g++) {
        printf "\ndn: cn=group%04d,ou=bulkgroups,%s\n", g, base
        printf "objectClass: groupOfNames\ncn: group%04d\ndescription: generated group %d\n", g, g
        for (m = 0; m < per; m++) {
            u = ((g - 1) * per + m) % people + 1
            printf "member: uid=user%06d,ou=bulk,%s\n", u, base
        }
    }
}'
