"""ldapproxy: a TLS-terminating LDAP proxy for clients that can only speak plain LDAP."""

__version__ = "0.1.0"
