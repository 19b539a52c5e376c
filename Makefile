# ldapsync: `make run` starts the demo, `make test` runs every test,
# `make deb` builds the Debian package. Each target installs what it needs
# first, and only that (idempotent).

SHELL := /bin/bash
CARGO ?= cargo
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# The demo: a directory, its tools and the Rust build.
RUN_PACKAGES := slapd ldap-utils
# The tests add PostgreSQL, 389 Directory Server (and iproute2, with which
# its fixture sets up a private network namespace), man (the man pages must
# render), libldap2-dev and libsasl2-dev, from which python-ldap builds, and
# chromium with its WebDriver, in which the web console is tested.
TEST_PACKAGES := $(RUN_PACKAGES) libldap2-dev libsasl2-dev postgresql 389-ds-base iproute2 man-db \
  chromium chromium-driver
# The Python LDAP clients the protocol tests drive, in a project-local venv.
VENV := .venv
PY_REQUIREMENTS := protocol-tests/python/requirements.txt

.PHONY: deps deps-run run run-cluster test fuzz lint clean bench bench-smoke bench-instructions bench-deps deb deb-deps test-deb

# Installs the Debian packages in $(1) that are missing, and only those.
define apt_install
missing=""; \
for p in $(1); do \
  dpkg-query -W -f='$${Status}' "$$p" 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
done; \
if [ -n "$$missing" ]; then \
  echo "make: installing$$missing"; \
  $(SUDO) apt-get update -qq && \
  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
fi
endef

# Seconds per fuzz target in `make test`; `make fuzz FUZZ_SECONDS=3600` for a long run.
FUZZ_SECONDS ?= 10

deps-run:
	@$(call apt_install,$(RUN_PACKAGES))
	@command -v $(CARGO) >/dev/null || { echo "make: cargo (the Rust toolchain) is required" >&2; exit 1; }

# The tests' Debian packages, cargo-fuzz, then the Python venv. The venv
# keeps a copy of the requirements it was installed from: when that copy
# matches, pip is not run.
deps: deps-run
	@$(call apt_install,$(TEST_PACKAGES))
	@command -v cargo-fuzz >/dev/null || $(CARGO) install -q cargo-fuzz --locked
	@if [ ! -x $(VENV)/bin/python ] || ! cmp -s $(PY_REQUIREMENTS) $(VENV)/requirements.installed; then \
	  echo "make deps: installing $(PY_REQUIREMENTS) into $(VENV)"; \
	  { [ -x $(VENV)/bin/python ] || python3 -m venv $(VENV); } && \
	  $(VENV)/bin/pip install -q -r $(PY_REQUIREMENTS) && \
	  cp $(PY_REQUIREMENTS) $(VENV)/requirements.installed; \
	fi

run: deps-run
	$(CARGO) build --release --bin ldapsync
	fixtures/run-demo.sh target/release/ldapsync

# Two instances on one PostgreSQL store (docs/high-availability.md).
run-cluster: deps-run
	@$(call apt_install,postgresql)
	$(CARGO) build --release --bin ldapsync
	fixtures/run-cluster.sh target/release/ldapsync

# A short fuzz run of each target, then every test (every suite runs even
# after one fails, so that a run shows all its failures). The last line totals
# every test binary's results ("N passed, N failed").
# Tests that cannot run here say so in $(SKIP_LOG), summed up last.
SKIP_LOG := $(CURDIR)/target/skipped-suites.txt
# The suites that run on both stores (tests named *sqlite* are about the file).
PG_TESTS := --test sync --test cli --test admin_side
# The differential suites (client by client, ldapsync against slapd) run a
# third time through a multiplexed listener; the relay's suites a fourth
# time with sessions on session threads of their own (proxy.session_threads),
# and the differential ones a fifth, multiplexed on session threads.
MUX_TESTS := --test ldap_utils --test relay_ldap3 --test python_clients

test: deps
	fuzz/run.sh $(FUZZ_SECONDS)
	@mkdir -p target; rm -f $(SKIP_LOG)
	@set -o pipefail; { LDAPSYNC_SKIP_LOG=$(SKIP_LOG) $(CARGO) test --workspace --no-fail-fast && \
	  echo "== the store's integration tests again, on PostgreSQL ==" && \
	  LDAPSYNC_TEST_STORE=postgresql LDAPSYNC_SKIP_LOG=$(SKIP_LOG) $(CARGO) test --no-fail-fast -p ldapsync $(PG_TESTS) -- --skip sqlite && \
	  echo "== the differential suites again, through a multiplexed listener ==" && \
	  LDAPSYNC_TEST_LISTENER=multiplexed LDAPSYNC_SKIP_LOG=$(SKIP_LOG) $(CARGO) test --no-fail-fast -p protocol-tests $(MUX_TESTS) && \
	  echo "== the relay's suites again, with sessions on two session threads ==" && \
	  LDAPSYNC_TEST_SESSION_THREADS=2 LDAPSYNC_SKIP_LOG=$(SKIP_LOG) $(CARGO) test --no-fail-fast -p protocol-tests && \
	  echo "== the differential suites through a multiplexed listener on session threads ==" && \
	  LDAPSYNC_TEST_LISTENER=multiplexed LDAPSYNC_TEST_SESSION_THREADS=2 LDAPSYNC_SKIP_LOG=$(SKIP_LOG) \
	    $(CARGO) test --no-fail-fast -p protocol-tests $(MUX_TESTS); \
	} 2>&1 | awk '{ print } \
	  /^test result:/ { passed += $$4; failed += $$6 } \
	  END { printf "%d passed, %d failed\n", passed, failed }'
	@if [ -s $(SKIP_LOG) ]; then echo "skipped: $$(sort -u $(SKIP_LOG) | wc -l) suite(s):"; sort -u $(SKIP_LOG) | sed 's/^/  /'; else echo "skipped: none"; fi

fuzz: deps
	fuzz/run.sh $(FUZZ_SECONDS)

# The benchmarks (bench/run.sh; docs/performance.md): installs what they need
# (slapd, ldap-utils, 389-ds-base for ldclt, haproxy, time, iproute2), then
# about 27 minutes of runs.
# `bench/run.sh --smoke` is a seconds-long version.
bench: bench-deps
	bench/run.sh

# A minute of tiny runs of every scenario: CI runs it so that `make bench`
# keeps working; its figures mean nothing.
bench-smoke: bench-deps
	bench/run.sh --smoke

# User-space instructions and simulated cache misses per relayed search,
# ldapsync against HAProxy (callgrind): the relay's own cost, exactly,
# where CPU time is noisy.
bench-instructions: bench-deps
	bench/instructions.sh

bench-deps: deps
	@$(call apt_install,389-ds-base haproxy time iproute2 valgrind)

# The Debian package (docs/operations.md, "Install"): the release binary,
# its man pages and completions generated from the CLI definition,
# ldapsync.toml(5) from the configuration reference, then cargo-deb.
DEB_ASSETS := target/deb-assets
deb-deps: deps-run
	@$(call apt_install,lowdown)
	@command -v cargo-deb >/dev/null || $(CARGO) install -q cargo-deb --locked

deb: deb-deps
	$(CARGO) build --release --bin ldapsync
	rm -rf $(DEB_ASSETS) target/debian && mkdir -p $(DEB_ASSETS)/man $(DEB_ASSETS)/completions
	target/release/ldapsync man-pages $(DEB_ASSETS)/man
	{ printf '# NAME\n\nldapsync.toml \\- the configuration file of ldapsync\n\n# DESCRIPTION\n\n'; \
	  tail -n +2 docs/configuration.md; } | \
	  lowdown -s -Tman -M title=ldapsync.toml -M section=5 -M source=ldapsync >$(DEB_ASSETS)/man/ldapsync.toml.5
	gzip -9n $(DEB_ASSETS)/man/*
	for shell in bash fish; do target/release/ldapsync completions $$shell >$(DEB_ASSETS)/completions/ldapsync.$$shell; done
	target/release/ldapsync completions zsh >$(DEB_ASSETS)/completions/_ldapsync
	$(CARGO) deb --no-build --output target/debian/
	@ls target/debian/*.deb

# Installs the package on this machine, checks it, then purges it (root;
# CI runs it).
test-deb: deb
	@$(call apt_install,lintian man-db)
	tests/deb.sh target/debian/ldapsync_*.deb

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

clean:
	$(CARGO) clean
	rm -rf .run fuzz/target
