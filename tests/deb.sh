#!/usr/bin/env bash
# Usage: tests/deb.sh PACKAGE.deb
#
# The Debian package as an administrator meets it (`make test-deb`; CI runs
# it as root on a throw-away machine): its contents and lintian's verdict,
# then installed on this machine, checked (version, configuration, man
# pages, completions, the unit, the user and the owner-only directories),
# removed and purged. Exits non-zero at the first check that fails.
set -euo pipefail
deb=$1
fail() { echo "deb.sh: FAILED: $*" >&2; exit 1; }
step() { echo "deb.sh: $*"; }
[ "$(id -u)" = 0 ] || fail "installing a package needs root"
if dpkg-query -W -f='${Status}' ldapsync 2>/dev/null | grep -q "ok installed"; then
    fail "ldapsync is installed on this machine already; this test installs and purges its own"
fi

step "contents"
contents=$(dpkg-deb -c "$deb")
for path in ./usr/bin/ldapsync ./etc/ldapsync/ldapsync.toml ./usr/lib/systemd/system/ldapsync.service \
    ./usr/lib/sysusers.d/ldapsync.conf ./usr/share/man/man1/ldapsync.1.gz \
    ./usr/share/man/man1/ldapsync-serve.1.gz ./usr/share/man/man1/ldapsync-account-add.1.gz \
    ./usr/share/man/man5/ldapsync.toml.5.gz ./usr/share/bash-completion/completions/ldapsync \
    ./usr/share/zsh/vendor-completions/_ldapsync ./usr/share/fish/vendor_completions.d/ldapsync.fish \
    ./usr/share/doc/ldapsync/copyright ./usr/share/doc/ldapsync/README.md \
    ./usr/share/doc/ldapsync/docs/configuration.md; do
    grep -q " $path\$" <<<"$contents" || fail "$path is not in the package"
done
dpkg-deb -f "$deb" Conffiles 2>/dev/null | grep -q /etc/ldapsync/ldapsync.toml ||
    dpkg-deb -I "$deb" conffiles | grep -q /etc/ldapsync/ldapsync.toml || fail "ldapsync.toml is not a conffile"

if command -v lintian >/dev/null; then
    step "lintian"
    # Errors fail; warnings are printed for the reader.
    verdict=$(lintian --tag-display-limit 0 "$deb" 2>&1 || true)
    [ -z "$verdict" ] || printf '%s\n' "$verdict"
    ! grep -q '^E:' <<<"$verdict" || fail "lintian reports errors"

fi

step "install"
dpkg -i "$deb"
trap 'dpkg --purge ldapsync >/dev/null 2>&1 || true' EXIT
ldapsync --version | grep -Eq '^ldapsync [0-9]+\.[0-9]+\.[0-9]+ \(' || fail "ldapsync --version: $(ldapsync --version)"
ldapsync check-config /etc/ldapsync/ldapsync.toml || fail "the packaged configuration does not check"
getent passwd ldapsync >/dev/null || fail "no ldapsync user"
[ "$(stat -c '%U %a' /var/lib/ldapsync)" = "ldapsync 700" ] || fail "/var/lib/ldapsync: $(stat -c '%U %a' /var/lib/ldapsync)"
[ "$(stat -c '%G %a' /etc/ldapsync/ldapsync.toml)" = "ldapsync 640" ] || fail "ldapsync.toml: $(stat -c '%G %a' /etc/ldapsync/ldapsync.toml)"

step "the unit's command as the ldapsync user, with an edited configuration"
# What `systemctl start ldapsync` runs (no systemd here to run it): the
# user reads the configuration and creates its store, owner-only.
sed -i 's|^listen = .*|listen = ["ldap://127.0.0.1:0"]|' /etc/ldapsync/ldapsync.toml
log=$(mktemp)
(cd /var/lib/ldapsync && exec setpriv --reuid=ldapsync --regid=ldapsync --init-groups \
    /usr/bin/ldapsync --config /etc/ldapsync/ldapsync.toml serve) 2>"$log" &
served=$!
for _ in $(seq 100); do grep -q "listening" "$log" && break; sleep 0.1; done
grep -q "listening" "$log" || { cat "$log" >&2; fail "serve did not start as the ldapsync user"; }
# Its admin socket, in the state directory, answers status.
for _ in $(seq 50); do [ -S /var/lib/ldapsync/ldapsync.sock ] && break; sleep 0.1; done
[ "$(stat -c '%U' /var/lib/ldapsync/ldapsync.sock 2>&1)" = ldapsync ] || fail "no admin socket of the ldapsync user"
setpriv --reuid=ldapsync --regid=ldapsync --init-groups ldapsync --config /etc/ldapsync/ldapsync.toml status >/dev/null ||
    fail "status does not reach the service"
kill -TERM "$served"
wait "$served" || { cat "$log" >&2; fail "serve did not stop cleanly on SIGTERM"; }
rm -f "$log"

step "man pages"
pages=$(dpkg -L ldapsync | grep '^/usr/share/man/.*\.gz$')
for page in $pages; do
    # groff's own complaints (a table line it cannot fill) are no failure;
    # a page that does not render, or renders empty, is.
    out=$(man -l "$page" 2>/dev/null) || fail "man -l $page"
    grep -q NAME <<<"$out" || fail "$page has no NAME section"
done
step "$(wc -w <<<"$pages") man pages render"

step "completions"
bash -n /usr/share/bash-completion/completions/ldapsync || fail "the bash completion does not parse"
bash -c 'source /usr/share/bash-completion/completions/ldapsync && complete -p ldapsync' >/dev/null ||
    fail "the bash completion registers nothing"
if command -v zsh >/dev/null; then zsh -n /usr/share/zsh/vendor-completions/_ldapsync || fail "zsh completion"; fi
if command -v fish >/dev/null; then fish -n /usr/share/fish/vendor_completions.d/ldapsync.fish || fail "fish completion"; fi

step "the unit"
complaints=$(systemd-analyze verify /usr/lib/systemd/system/ldapsync.service 2>&1) || fail "systemd-analyze verify: $complaints"
[ -z "$complaints" ] || fail "systemd-analyze verify: $complaints"

step "remove, then purge"
echo "# an administrator's own file" >/etc/ldapsync/service.secret
[ -e /var/lib/ldapsync/ldapsync.db ] || install -o ldapsync -g ldapsync -m 0600 /dev/null /var/lib/ldapsync/ldapsync.db
dpkg --remove ldapsync
[ ! -e /usr/bin/ldapsync ] || fail "the binary outlives remove"
[ -f /etc/ldapsync/ldapsync.toml ] || fail "remove took the configuration (a conffile stays until purge)"
grep -q 'ldap://127.0.0.1:0' /etc/ldapsync/ldapsync.toml || fail "remove reverted the edited configuration"
dpkg --purge ldapsync
trap - EXIT
[ ! -e /etc/ldapsync/ldapsync.toml ] || fail "purge left the configuration"
[ -f /etc/ldapsync/service.secret ] || fail "purge took a file the administrator added"
[ -f /var/lib/ldapsync/ldapsync.db ] || fail "purge took the store"
rm -rf /etc/ldapsync /var/lib/ldapsync
step "ok"
