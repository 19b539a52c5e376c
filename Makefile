# ldapsync: `make run` starts the demo, `make test` runs every test.
# Each target installs what it needs first (`make deps`, idempotent).

SHELL := /bin/bash
CARGO ?= cargo
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_PACKAGES := slapd ldap-utils

.PHONY: deps run test lint clean

deps:
	@missing=""; \
	for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' "$$p" 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "make deps: installing$$missing"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	@command -v $(CARGO) >/dev/null || { echo "make deps: cargo (the Rust toolchain) is required" >&2; exit 1; }

run: deps
	$(CARGO) build --release --bin ldapsync
	fixtures/run-demo.sh target/release/ldapsync

# The last line totals every test binary's results ("N passed, N failed").
test: deps
	@set -o pipefail; $(CARGO) test --workspace 2>&1 | awk '{ print } \
	  /^test result:/ { passed += $$4; failed += $$6 } \
	  END { printf "%d passed, %d failed\n", passed, failed }'

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

clean:
	$(CARGO) clean
	rm -rf .run
