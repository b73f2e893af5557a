"""Bundled ldapproxy plugins, installed as ``ldapproxy.plugins``."""
