"""Helpers for the integration tests: a real slapd, loopback ports and ldap-utils."""
