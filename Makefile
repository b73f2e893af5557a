# ldapproxy: the two commands that matter are `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test soak fuzz lint format system-deps client-tools clean

$(STAMP): setup.cfg pyproject.toml
	@# Debian's python3 ships venv/ensurepip separately.
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { \
		echo "installing python3-venv with apt-get"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,lint]'
	touch $@

# The demo prints ldapwhoami/ldapsearch commands to try: make sure ldap-utils is there.
demo: client-tools $(STAMP)
	$(BIN)/ldapproxy demo

client-tools:
	@command -v ldapwhoami >/dev/null 2>&1 || { \
		echo "installing ldap-utils with apt-get"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ldap-utils >/dev/null; }

# slapd and ldap-utils come from Debian; the suite starts its own slapd on loopback.
system-deps:
	@if ! command -v slapd >/dev/null 2>&1 && ! test -x /usr/sbin/slapd || ! command -v ldapsearch >/dev/null 2>&1; then \
		echo "installing slapd and ldap-utils with apt-get"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slapd ldap-utils >/dev/null; \
		if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet slapd 2>/dev/null; then \
			echo "stopping the slapd service the package started (the tests run their own)"; \
			systemctl disable --now slapd >/dev/null 2>&1 || true; \
		fi; \
	fi

# HAProxy for the scale-out test; promtool (from Debian's prometheus package, extracted
# into the venv rather than installed, so that no Prometheus service starts) to check the
# alert rules.  Without promtool the rules are still parsed and checked as YAML.
# sslyze, the TLS scanner of the conformance tests, in a venv of its own: it pins a
# cryptography older than the one pyOpenSSL needs.
SCAN_VENV := .venv-scan
SSLYZE_VERSION := 6.3.1
TEST_TOOLS := $(BIN)/promtool $(SCAN_VENV)/bin/sslyze

$(SCAN_VENV)/bin/sslyze:
	test -x $(SCAN_VENV)/bin/python || $(PYTHON) -m venv $(SCAN_VENV)
	$(SCAN_VENV)/bin/pip install --quiet --upgrade pip
	$(SCAN_VENV)/bin/pip install --quiet 'sslyze==$(SSLYZE_VERSION)'

$(BIN)/promtool: | $(STAMP)
	@command -v haproxy >/dev/null 2>&1 || { \
		echo "installing haproxy with apt-get"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends haproxy >/dev/null; \
		if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet haproxy 2>/dev/null; then \
			systemctl disable --now haproxy >/dev/null 2>&1 || true; fi; }
	@if command -v promtool >/dev/null 2>&1; then ln -sf "$$(command -v promtool)" $@; else \
		echo "extracting promtool from Debian's prometheus package"; \
		tmp=$$(mktemp -d) && (cd $$tmp && apt-get download -qq prometheus >/dev/null 2>&1 && \
			dpkg-deb -x prometheus_*.deb root && cp root/usr/bin/promtool $(CURDIR)/$@) || \
			echo "promtool unavailable: the alert rules are checked as YAML only"; \
		rm -rf $$tmp; fi

test: system-deps $(STAMP) $(TEST_TOOLS)
	PATH="$(CURDIR)/$(BIN):$$PATH" SSLYZE="$(CURDIR)/$(SCAN_VENV)/bin/sslyze" \
		$(BIN)/pytest -q -p no:cacheprovider

# `make soak`: tests/test_soak.py for SOAK_SECONDS (600 by default; make test runs 60):
# mixed load with reloads, certificate rotation and directory restarts, and its report.
SOAK_SECONDS ?= 600
soak: system-deps $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" SOAK_SECONDS=$(SOAK_SECONDS) \
		$(BIN)/pytest -q -s -p no:cacheprovider tests/test_soak.py

# `make fuzz`: each atheris target of fuzz/atheris_targets.py for FUZZ_SECONDS (make test
# runs a few thousand inputs of each); crashes are written to build/fuzz/.
FUZZ_SECONDS ?= 60
fuzz: $(STAMP)
	@mkdir -p build/fuzz
	for target in framer decoders proxy_protocol; do \
		$(BIN)/python fuzz/atheris_targets.py $$target -max_total_time=$(FUZZ_SECONDS) \
			-artifact_prefix=build/fuzz/ || exit 1; done

lint: $(STAMP)
	$(BIN)/ruff check ldapproxy plugins tests bench fuzz
	$(BIN)/ruff format --check ldapproxy plugins tests bench fuzz
	$(BIN)/mypy ldapproxy
	$(BIN)/mypy plugins

format: $(STAMP)
	$(BIN)/ruff format ldapproxy plugins tests bench fuzz
	$(BIN)/ruff check --fix ldapproxy plugins tests bench fuzz

clean:
	rm -rf $(VENV) $(SCAN_VENV) build *.egg-info .mypy_cache .ruff_cache

# `make bench`: direct slapd against the proxy, side by side, in one run (bench/README.rst).
# The load generator is C against libldap: it needs a C compiler and libldap's headers.
.PHONY: bench bench-deps
BENCH_LOADGEN := bench/build/loadgen
BENCH_CFLAGS ?= -O2 -g -Wall -Wextra

bench-deps: system-deps
	@if ! command -v $(CC) >/dev/null 2>&1 || ! test -f /usr/include/ldap.h || ! test -f /usr/include/lber.h; then \
		echo "installing gcc, libc6-dev and libldap-dev with apt-get"; \
		apt-get update -qq && { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc libc6-dev libldap-dev >/dev/null \
			|| DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc libc6-dev libldap2-dev >/dev/null; }; \
	fi

$(BENCH_LOADGEN): bench/loadgen.c | bench-deps
	@mkdir -p $(@D)
	$(CC) $(BENCH_CFLAGS) -o $@ $< -lldap -llber -lpthread

bench: bench-deps $(STAMP) $(BENCH_LOADGEN)
	$(BIN)/python bench/run.py
