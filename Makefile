# ldapproxy: the two commands that matter are `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint format system-deps client-tools clean

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

test: system-deps $(STAMP)
	$(BIN)/pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check ldapproxy plugins tests
	$(BIN)/ruff format --check ldapproxy plugins tests
	$(BIN)/mypy ldapproxy
	$(BIN)/mypy plugins

format: $(STAMP)
	$(BIN)/ruff format ldapproxy plugins tests
	$(BIN)/ruff check --fix ldapproxy plugins tests

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache
