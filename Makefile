# ldapproxy: the two commands that matter are `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint format system-deps clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,lint]'
	touch $@

demo: $(STAMP)
	$(BIN)/ldapproxy demo

# slapd and ldap-utils come from Debian; the suite starts its own slapd on loopback.
system-deps:
	@if ! command -v slapd >/dev/null 2>&1 && ! test -x /usr/sbin/slapd || ! command -v ldapsearch >/dev/null 2>&1; then \
		echo "installing slapd and ldap-utils with apt-get"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slapd ldap-utils >/dev/null; \
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
