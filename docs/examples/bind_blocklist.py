"""bind_blocklist: an example third-party ldapproxy plugin.

Privileged accounts should not log in through a front door meant for legacy applications.
This plugin refuses simple binds as the listed DNs with unwillingToPerform before they
reach the directory, logs nothing itself (the proxy logs every deny with the plugin's
name) and counts refusals in a Prometheus counter.  Load it with::

    [[plugin]]
    use = "bind_blocklist:BindBlocklist"   # the module must be importable by ldapproxy
    dns = ["cn=admin,dc=example,dc=com"]
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import Counter

from ldapproxy.hooks import ALLOW, Plugin, PluginContext, PluginOptions, Request, Verdict, deny


def normalise(dn: str) -> str:
    """Lower-case, without spaces around separators: enough to compare DNs written by
    people (a DN with escaped commas or multi-valued RDNs needs a real DN parser)."""
    rdns = (rdn.strip() for rdn in dn.split(","))
    return ",".join("=".join(p.strip() for p in rdn.split("=", 1)) for rdn in rdns).lower()


class BindBlocklist(Plugin):
    """Refuses simple binds as any of ``dns``."""

    #: The keys of this plugin's [[plugin]] table, with their documented defaults.
    options = {"dns": "required"}
    #: Only binds are decoded for this plugin (it reads the bind DN); every other
    #: request stays on the undecoded fast path.
    request_fields = frozenset({"bind"})

    def __init__(self, dns: Iterable[str], refused: Counter) -> None:
        self._blocked = frozenset(normalise(dn) for dn in dns)
        self._refused = refused

    @classmethod
    def from_config(cls, options: PluginOptions, context: PluginContext) -> BindBlocklist:
        dns = options.value("dns")
        if not isinstance(dns, list) or not dns or not all(isinstance(d, str) and d for d in dns):
            raise options.error("dns", dns, "expected a non-empty list of DNs")
        options.finish()  # any other key is a typo: fail at startup, naming it
        refused = Counter(
            "bind_blocklist_refused_total",
            "Binds refused because the DN is on the blocklist.",
            registry=context.registry,
        )
        return cls(dns, refused)

    def request(self, request: Request) -> Verdict:
        fields = request.fields
        if request.op != "bind" or fields is None or fields.mechanism != "simple":
            return ALLOW
        if normalise(fields.dn) in self._blocked:
            self._refused.inc()
            return deny(53, "this account may not bind through this proxy", "blocked_dn")
        return ALLOW
