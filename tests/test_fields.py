"""Unit tests for ldapproxy.fields: the request fields plugins read, and the secrets they never
see.

Requests are encoded by real client libraries (ldaptor, and ldap3 where ldaptor cannot say
it: ldaptor's filter parser reads ``\\XX`` escapes as Latin-1 characters), and by hand only
for encodings neither library produces.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ldapproxy import messages as m
from ldapproxy.ber import (
    BOOLEAN,
    ENUMERATED,
    OCTET_STRING,
    SEQUENCE,
    BerError,
    encode_integer,
    encode_message,
    tlv,
)
from ldapproxy.fields import PASSWORD_ATTRIBUTES, RequestFields, decode_fields

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from ldap3 import DEREF_NEVER, SUBTREE
    from ldap3.operation.search import search_operation
    from ldap3.protocol.rfc4511 import LDAPMessage, MessageID, ProtocolOp
    from ldaptor import delta, ldapfilter
    from ldaptor.protocols import pureber, pureldap
    from pyasn1.codec.ber import encoder as asn1_encoder

BASE = "dc=example,dc=com"
#: A secret that must never show up in decoded fields.
SECRET = "Hunter2-s3cret"


# -- building requests ------------------------------------------------------------------------


def parse_filter(text: str) -> Any:
    """ldaptor's filter object for ``text`` (its parser uses deprecated pyparsing names)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return ldapfilter.parseFilter(text)


def ldaptor_pdu(request: Any, controls: list[tuple[Any, ...]] | None = None) -> bytes:
    """The wire form of ``request`` in an LDAPMessage, as ldaptor's client sends it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return bytes(pureldap.LDAPMessage(id=7, value=request, controls=controls).toWire())


def ldaptor_search(
    filter_text: str, attributes: tuple[str, ...] = (), scope: int = 2, base: str = BASE
) -> bytes:
    """A SearchRequest PDU for ``filter_text``, parsed and encoded by ldaptor."""
    return ldaptor_pdu(
        pureldap.LDAPSearchRequest(
            baseObject=base,
            scope=scope,
            filter=parse_filter(filter_text),
            attributes=list(attributes),
        )
    )


def ldap3_search(filter_text: str) -> bytes:
    """A SearchRequest PDU for ``filter_text``, parsed and encoded by ldap3."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        request = search_operation(
            BASE, filter_text, SUBTREE, DEREF_NEVER, ["cn"], 0, 0, False, False, False
        )
        message = LDAPMessage()
        message["messageID"] = MessageID(3)
        message["protocolOp"] = ProtocolOp().setComponentByName("searchRequest", request)
        return bytes(asn1_encoder.encode(message))


def raw_search(filter_element: bytes, scope: int = 2) -> bytes:
    """A SearchRequest PDU around a hand-encoded Filter element."""
    body = (
        tlv(OCTET_STRING, BASE.encode())
        + encode_integer(scope, ENUMERATED)
        + encode_integer(0, ENUMERATED)
        + encode_integer(0)
        + encode_integer(0)
        + tlv(BOOLEAN, b"\x00")
        + filter_element
        + tlv(SEQUENCE, b"")
    )
    return encode_message(1, tlv(m.SEARCH_REQUEST, body))


def ava(tag: int, attribute: bytes, value: bytes) -> bytes:
    """An AttributeValueAssertion filter item."""
    return tlv(tag, tlv(OCTET_STRING, attribute) + tlv(OCTET_STRING, value))


def search_filter(pdu: bytes) -> str | None:
    """The decoded filter of a SearchRequest PDU."""
    return decode_fields(m.SEARCH_REQUEST, pdu).filter


# -- search filters ---------------------------------------------------------------------------

#: (filter as a client writes it, the canonical RFC 4515 string decoded from the wire)
LDAPTOR_FILTERS = [
    pytest.param("(cn=alice)", "(cn=alice)", id="equality"),
    pytest.param("(objectClass=*)", "(objectClass=*)", id="present"),
    pytest.param("(cn=al*)", "(cn=al*)", id="initial"),
    pytest.param("(cn=*ice)", "(cn=*ice)", id="final"),
    pytest.param("(cn=*li*)", "(cn=*li*)", id="any"),
    pytest.param("(cn=a*l*i*e)", "(cn=a*l*i*e)", id="initial-any-final"),
    pytest.param("(cn=*a*b*)", "(cn=*a*b*)", id="two-any"),
    pytest.param("(uidNumber>=1000)", "(uidNumber>=1000)", id="greater-or-equal"),
    pytest.param("(uidNumber<=1000)", "(uidNumber<=1000)", id="less-or-equal"),
    pytest.param("(sn~=smyth)", "(sn~=smyth)", id="approx"),
    pytest.param("(!(cn=bob))", "(!(cn=bob))", id="not"),
    pytest.param(
        "(&(objectClass=person)(|(uid=a)(uid=b))(!(sn=c*)))",
        "(&(objectClass=person)(|(uid=a)(uid=b))(!(sn=c*)))",
        id="nested",
    ),
    pytest.param("(cn:caseExactMatch:=Alice)", "(cn:caseExactMatch:=Alice)", id="ext-type-rule"),
    pytest.param("(cn:dn:2.5.13.5:=Alice)", "(cn:dn:2.5.13.5:=Alice)", id="ext-type-dn-rule"),
    pytest.param("(ou:dn:=people)", "(ou:dn:=people)", id="ext-type-dn"),
    # Without a type the rule applies to every attribute, password ones too: redacted.
    pytest.param("(:dn:2.4.6.8.10:=Dino)", "(:dn:2.4.6.8.10:=***)", id="ext-dn-rule"),
    pytest.param("(cn;lang-de=Kim)", "(cn;lang-de=Kim)", id="attribute-options"),
    pytest.param(r"(cn=a\2ab)", r"(cn=a\2ab)", id="escaped-star"),
    pytest.param(r"(cn=\28x\29)", r"(cn=\28x\29)", id="escaped-parens"),
    pytest.param(r"(cn=back\5cslash)", r"(cn=back\5cslash)", id="escaped-backslash"),
    pytest.param(r"(cn=nul\00)", r"(cn=nul\00)", id="escaped-nul"),
    pytest.param(r"(cn=A\2AB)", r"(cn=A\2aB)", id="uppercase-escape-becomes-lowercase"),
    pytest.param(r"(cn=a*b\2a)", r"(cn=a*b\2a)", id="escaped-star-in-substring"),
    pytest.param(r"(cn=\28*\29)", r"(cn=\28*\29)", id="escaped-parens-in-substring"),
    pytest.param("(sn=Müller)", "(sn=Müller)", id="utf8-kept"),
    pytest.param("(cn=日本*)", "(cn=日本*)", id="utf8-substring"),
]


@pytest.mark.parametrize(("text", "expected"), LDAPTOR_FILTERS)
def test_ldaptor_filters_decode_to_their_canonical_string(text: str, expected: str) -> None:
    """A filter encoded by ldaptor decodes to its canonical RFC 4515 string."""
    assert search_filter(ldaptor_search(text)) == expected


LDAP3_FILTERS = [
    pytest.param(r"(cn=\ff\fe)", r"(cn=\ff\fe)", id="non-utf8-bytes"),
    pytest.param(r"(cn=ok\ffé)", r"(cn=ok\ffé)", id="non-utf8-between-utf8"),
    pytest.param(r"(sn=M\c3\bcller)", "(sn=Müller)", id="escaped-utf8-unescaped"),
    pytest.param(r"(cn=\c3)", r"(cn=\c3)", id="truncated-utf8"),
    pytest.param(r"(cn=\c0\af)", r"(cn=\c0\af)", id="overlong-utf8"),
    pytest.param(r"(cn=\ed\a0\80)", r"(cn=\ed\a0\80)", id="encoded-surrogate"),
    pytest.param(r"(cn=\f4\90\80\80)", r"(cn=\f4\90\80\80)", id="beyond-unicode"),
    pytest.param(r"(cn=\01\7f)", "(cn=\x01\x7f)", id="control-characters-kept"),
    pytest.param(r"(jpegPhoto=\ff\d8\ff\e0)", r"(jpegPhoto=\ff\d8\ff\e0)", id="binary"),
]


@pytest.mark.parametrize(("text", "expected"), LDAP3_FILTERS)
def test_ldap3_filters_escape_bytes_outside_utf8(text: str, expected: str) -> None:
    """Bytes that are not valid UTF-8 come back as lowercase ``\\XX``, valid UTF-8 unescaped."""
    assert search_filter(ldap3_search(text)) == expected


RAW_FILTERS = [
    pytest.param(tlv(0xA0, b""), "(&)", id="absolute-true"),
    pytest.param(tlv(0xA1, b""), "(|)", id="absolute-false"),
    pytest.param(
        tlv(0xA4, tlv(OCTET_STRING, b"cn") + tlv(SEQUENCE, tlv(0x81, b"\xff*"))),
        r"(cn=*\ff\2a*)",
        id="non-utf8-substring",
    ),
    pytest.param(
        tlv(0xA9, tlv(0x82, b"cn") + tlv(0x83, b"x") + tlv(0x84, b"\x00")),
        "(cn:=x)",
        id="ext-dnattributes-false",
    ),
    pytest.param(
        tlv(0xA9, tlv(0x81, b"2.5.13.2") + tlv(0x83, b"(\\)")),
        r"(:2.5.13.2:=***)",
        id="ext-rule-only-redacted",
    ),
    pytest.param(ava(0xA3, b"c\xffn", b"x"), r"(c\ef\bf\bdn=x)", id="non-utf8-attribute"),
    pytest.param(ava(0xA3, b"x=1)(uid=a", b"b"), r"(x\3d1\29\28uid\3da=b)", id="hostile-attribute"),
]


@pytest.mark.parametrize(("element", "expected"), RAW_FILTERS)
def test_hand_encoded_filters_decode_to_their_canonical_string(
    element: bytes, expected: str
) -> None:
    """Filters no client library here produces (RFC 4526 absolutes, raw bytes) decode too."""
    assert search_filter(raw_search(element)) == expected


# -- secrets in filters -------------------------------------------------------------------------

REDACTED_FILTERS = [
    pytest.param(f"(userPassword={SECRET})", "(userPassword=***)", ldaptor_search, id="equality"),
    pytest.param(f"(unicodePwd={SECRET})", "(unicodePwd=***)", ldaptor_search, id="unicodePwd"),
    pytest.param(
        f"(userPassword;binary={SECRET})",
        "(userPassword;binary=***)",
        ldaptor_search,
        id="with-option",
    ),
    # ldaptor's parser does not take numeric OIDs as attribute names; ldap3's does.
    pytest.param(f"(2.5.4.35={SECRET})", "(2.5.4.35=***)", ldap3_search, id="by-oid"),
    pytest.param(f"(USERPASSWORD={SECRET})", "(USERPASSWORD=***)", ldaptor_search, id="upper-case"),
    pytest.param(
        f"(sambaNTPassword={SECRET})", "(sambaNTPassword=***)", ldaptor_search, id="samba"
    ),
    pytest.param(
        f"(userPassword>={SECRET})", "(userPassword>=***)", ldaptor_search, id="greater-or-equal"
    ),
    pytest.param(
        f"(userPassword<={SECRET})", "(userPassword<=***)", ldaptor_search, id="less-or-equal"
    ),
    pytest.param(f"(userPassword~={SECRET})", "(userPassword~=***)", ldaptor_search, id="approx"),
    pytest.param(
        "(userPassword=Hunter2*s3cret)",
        "(userPassword=***)",
        ldaptor_search,
        id="substring-initial-final",
    ),
    pytest.param(
        "(userPassword=*Hunter2*)", "(userPassword=***)", ldaptor_search, id="substring-any"
    ),
    pytest.param(
        f"(userPassword:caseExactMatch:={SECRET})",
        "(userPassword:caseExactMatch:=***)",
        ldaptor_search,
        id="extensible",
    ),
    pytest.param(
        f"(userPassword;binary:dn:2.5.13.17:={SECRET})",
        "(userPassword;binary:dn:2.5.13.17:=***)",
        ldaptor_search,
        id="extensible-option-dn",
    ),
    pytest.param(
        f"(&(uid=bob)(|(userPassword={SECRET})(!(unicodePwd={SECRET}))))",
        "(&(uid=bob)(|(userPassword=***)(!(unicodePwd=***))))",
        ldaptor_search,
        id="nested",
    ),
]


@pytest.mark.parametrize(("text", "expected", "client"), REDACTED_FILTERS)
def test_password_values_in_filters_are_redacted(
    text: str, expected: str, client: Callable[[str], bytes]
) -> None:
    """A filter item on a password attribute shows ``***`` and its value appears nowhere."""
    pdu = client(text)
    assert b"Hunter2" in pdu
    fields = decode_fields(m.SEARCH_REQUEST, pdu)
    assert fields.filter == expected
    for fragment in ("Hunter2", "s3cret"):
        assert fragment not in repr(fields)


def test_password_presence_is_not_redacted() -> None:
    """A presence test on a password attribute has no value to hide and stays as it is."""
    assert search_filter(ldaptor_search("(userPassword=*)")) == "(userPassword=*)"


def test_every_password_attribute_is_redacted() -> None:
    """Each attribute in PASSWORD_ATTRIBUTES, in any letter case, has its value redacted."""
    for attribute in sorted(PASSWORD_ATTRIBUTES):
        for spelling in (attribute, attribute.upper()):
            pdu = ldap3_search(f"({spelling}={SECRET})")
            assert search_filter(pdu) == f"({spelling}=***)"


def test_non_utf8_password_value_is_redacted() -> None:
    """A binary password value is redacted like any other, not escaped."""
    pdu = raw_search(ava(0xA3, b"userPassword", b"\xffHunter2\x00"))
    fields = decode_fields(m.SEARCH_REQUEST, pdu)
    assert fields.filter == "(userPassword=***)"
    assert "Hunter2" not in repr(fields)


def test_similar_attribute_names_are_not_redacted() -> None:
    """Only password attributes are redacted: a name that merely contains one is not."""
    assert search_filter(ldaptor_search("(userPasswordHint=x)")) == "(userPasswordHint=x)"
    assert search_filter(ldaptor_search("(myuserPassword=x)")) == "(myuserPassword=x)"


# -- search -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("scope", "name"), [(0, "base"), (1, "one"), (2, "sub"), (3, "children")])
def test_search_fields(scope: int, name: str) -> None:
    """A search yields its base, scope name, filter and requested attributes, nothing else."""
    pdu = ldaptor_search("(uid=bob)", attributes=("cn", "mail", "+"), scope=scope)
    assert decode_fields(m.SEARCH_REQUEST, pdu) == RequestFields(
        dn=BASE, scope=name, filter="(uid=bob)", attributes=("cn", "mail", "+")
    )


def test_root_dse_search_from_the_proxy_itself() -> None:
    """The proxy's own root DSE probe decodes: empty base, base scope, objectClass present."""
    fields = decode_fields(m.SEARCH_REQUEST, m.root_dse_search(1, (b"namingContexts",)))
    assert fields == RequestFields(
        dn="", scope="base", filter="(objectClass=*)", attributes=("namingContexts",)
    )


def test_non_utf8_dn_is_replaced_not_rejected() -> None:
    """A base DN that is not UTF-8 decodes with replacement characters."""
    pdu = ldaptor_pdu(
        pureldap.LDAPSearchRequest(baseObject=b"o=caf\xe9", filter=parse_filter("(cn=x)"))
    )
    assert decode_fields(m.SEARCH_REQUEST, pdu).dn == "o=caf\ufffd"


def test_unknown_scope_is_malformed() -> None:
    """A search scope outside RFC 4511 and the subordinate-subtree extension is rejected."""
    with pytest.raises(BerError):
        decode_fields(m.SEARCH_REQUEST, raw_search(tlv(0x87, b"cn"), scope=4))


# -- bind -----------------------------------------------------------------------------------


def test_simple_bind_yields_dn_and_mechanism_but_never_the_password() -> None:
    """A simple bind yields its name and ``simple``; the password appears nowhere."""
    pdu = ldaptor_pdu(pureldap.LDAPBindRequest(dn="cn=admin," + BASE, auth=SECRET))
    fields = decode_fields(m.BIND_REQUEST, pdu)
    assert fields == RequestFields(dn="cn=admin," + BASE, mechanism="simple")
    assert SECRET.encode() in pdu
    assert SECRET not in repr(fields)


def test_anonymous_bind() -> None:
    """An anonymous bind has an empty name and the simple mechanism."""
    fields = decode_fields(m.BIND_REQUEST, m.anonymous_bind_request(1))
    assert fields == RequestFields(dn="", mechanism="simple")


@pytest.mark.parametrize(
    ("mechanism", "credentials"),
    [
        ("PLAIN", b"\x00bob\x00" + SECRET.encode()),
        ("DIGEST-MD5", b'username="bob",response=' + SECRET.encode()),
        ("EXTERNAL", None),
        ("GSSAPI", None),
    ],
)
def test_sasl_bind_yields_the_mechanism_but_never_the_credentials(
    mechanism: str, credentials: bytes | None
) -> None:
    """A SASL bind yields its mechanism; credentials, if any, appear nowhere."""
    pdu = ldaptor_pdu(pureldap.LDAPBindRequest(dn="", auth=(mechanism, credentials), sasl=True))
    fields = decode_fields(m.BIND_REQUEST, pdu)
    assert fields == RequestFields(dn="", mechanism=mechanism)
    assert SECRET not in repr(fields)


def test_unknown_bind_authentication_choice_has_no_mechanism() -> None:
    """A bind with an authentication choice other than simple or SASL has no mechanism."""
    body = encode_integer(3) + tlv(OCTET_STRING, b"cn=x") + tlv(0x89, b"NTLM")
    pdu = encode_message(2, tlv(m.BIND_REQUEST, body))
    assert decode_fields(m.BIND_REQUEST, pdu) == RequestFields(dn="cn=x")


# -- updates --------------------------------------------------------------------------------

ENTRY = "uid=bob,ou=people," + BASE


def test_add_yields_attribute_names_in_order_without_values() -> None:
    """An add yields its DN and attribute names, first spelling of repeats kept, never values."""

    def attribute(name: str, *values: str) -> tuple[Any, Any]:
        return (
            pureldap.LDAPAttributeDescription(name),
            pureber.BERSet([pureldap.LDAPAttributeValue(v) for v in values]),
        )

    request = pureldap.LDAPAddRequest(
        entry=ENTRY,
        attributes=[
            attribute("objectClass", "inetOrgPerson", "posixAccount"),
            attribute("uid", "bob"),
            attribute("userPassword", SECRET),
            attribute("mail", "bob@example.com"),
            attribute("MAIL", "robert@example.com"),
            attribute("cn;lang-de", "Robert"),
        ],
    )
    fields = decode_fields(m.ADD_REQUEST, ldaptor_pdu(request))
    assert fields == RequestFields(
        dn=ENTRY, attributes=("objectClass", "uid", "userPassword", "mail", "cn;lang-de")
    )
    for value in (SECRET, "inetOrgPerson", "bob@example", "Robert"):
        assert value not in repr(fields)


def test_modify_yields_modified_attribute_names_without_values() -> None:
    """A modify yields its DN and the modified names in order, repeats removed, never values."""
    request = delta.ModifyOp(
        ENTRY,
        [
            delta.Replace("userPassword", [SECRET]),
            delta.Add("mail", ["bob@example.com"]),
            delta.Delete("mail", ["old@example.com"]),
            delta.Delete("description"),
            delta.Replace("Mail", []),
        ],
    ).asLDAP()
    fields = decode_fields(m.MODIFY_REQUEST, ldaptor_pdu(request))
    assert fields == RequestFields(dn=ENTRY, attributes=("userPassword", "mail", "description"))
    for value in (SECRET, "bob@example", "old@example"):
        assert value not in repr(fields)


def test_delete_yields_the_dn() -> None:
    """A delete yields the DN it deletes."""
    fields = decode_fields(m.DEL_REQUEST, ldaptor_pdu(pureldap.LDAPDelRequest(entry=ENTRY)))
    assert fields == RequestFields(dn=ENTRY)


def test_moddn_without_new_superior() -> None:
    """A rename yields the DN and new RDN, and no new superior."""
    request = pureldap.LDAPModifyDNRequest(entry=ENTRY, newrdn="uid=robert", deleteoldrdn=1)
    fields = decode_fields(m.MODDN_REQUEST, ldaptor_pdu(request))
    assert fields == RequestFields(dn=ENTRY, new_rdn="uid=robert", new_superior=None)


def test_moddn_with_new_superior() -> None:
    """A move yields the DN, the new RDN and the new superior."""
    request = pureldap.LDAPModifyDNRequest(
        entry=ENTRY, newrdn="uid=bob", deleteoldrdn=0, newSuperior="ou=former," + BASE
    )
    fields = decode_fields(m.MODDN_REQUEST, ldaptor_pdu(request))
    assert fields == RequestFields(dn=ENTRY, new_rdn="uid=bob", new_superior="ou=former," + BASE)


def test_compare_yields_the_attribute_but_never_the_value() -> None:
    """A compare yields its DN and the compared attribute; the asserted value appears nowhere."""
    request = pureldap.LDAPCompareRequest(
        entry=ENTRY,
        ava=pureldap.LDAPAttributeValueAssertion(
            pureldap.LDAPAttributeDescription("userPassword"),
            pureldap.LDAPAssertionValue(SECRET),
        ),
    )
    fields = decode_fields(m.COMPARE_REQUEST, ldaptor_pdu(request))
    assert fields == RequestFields(dn=ENTRY, attributes=("userPassword",))
    assert SECRET not in repr(fields)


# -- extended, abandon, unbind, unknown ---------------------------------------------------------


def test_password_modify_yields_the_oid_but_never_the_passwords() -> None:
    """A password modify extended request yields its OID; its passwords appear nowhere."""
    request = pureldap.LDAPPasswordModifyRequest(
        userIdentity=ENTRY, oldPasswd="Old-" + SECRET, newPasswd="New-" + SECRET
    )
    pdu = ldaptor_pdu(request)
    assert SECRET.encode() in pdu
    fields = decode_fields(m.EXTENDED_REQUEST, pdu)
    assert fields == RequestFields(oid=m.PASSWORD_MODIFY_OID.decode())
    assert SECRET not in repr(fields)


@pytest.mark.parametrize("oid", [m.STARTTLS_OID, m.WHOAMI_OID])
def test_extended_without_value_yields_the_oid(oid: bytes) -> None:
    """StartTLS and Who am I? yield their OID."""
    pdu = ldaptor_pdu(pureldap.LDAPExtendedRequest(requestName=oid))
    assert decode_fields(m.EXTENDED_REQUEST, pdu) == RequestFields(oid=oid.decode())


def test_abandon_yields_the_abandoned_message_id() -> None:
    """An abandon yields the message ID it abandons."""
    pdu = ldaptor_pdu(pureldap.LDAPAbandonRequest(id=300))
    assert decode_fields(m.ABANDON_REQUEST, pdu) == RequestFields(abandoned=300)


def test_unbind_yields_nothing() -> None:
    """An unbind has no fields."""
    pdu = ldaptor_pdu(pureldap.LDAPUnbindRequest())
    assert decode_fields(m.UNBIND_REQUEST, pdu) == RequestFields()


def test_unknown_operation_yields_only_controls() -> None:
    """An operation the proxy does not know yields only its control OIDs."""
    control = tlv(SEQUENCE, tlv(OCTET_STRING, b"1.2.3.4"))
    pdu = encode_message(4, tlv(0x75, b"whatever"), tlv(0xA0, control))
    assert decode_fields(0x75, pdu) == RequestFields(controls=("1.2.3.4",))


def test_op_that_does_not_match_the_pdu_is_malformed() -> None:
    """Decoding a PDU as an operation it is not raises BerError."""
    with pytest.raises(BerError):
        decode_fields(m.BIND_REQUEST, ldaptor_search("(cn=x)"))


# -- controls -----------------------------------------------------------------------------------


def test_controls_yield_their_oids_in_order_without_values() -> None:
    """Control OIDs come back in order; control values and criticality are not decoded."""
    controls = [
        (m.PAGED_RESULTS_OID, True, pureber.BERSequence([pureber.BERInteger(50)]).toWire()),
        (b"1.2.840.113556.1.4.473", None, b"sort-" + SECRET.encode()),
        (b"1.3.6.1.4.1.4203.1.10.1", False, None),
        (b"2.16.840.1.113730.3.4.2", None, None),
    ]
    request = pureldap.LDAPSearchRequest(baseObject=BASE, filter=parse_filter("(a=b)"))
    fields = decode_fields(m.SEARCH_REQUEST, ldaptor_pdu(request, controls))
    assert fields.controls == (
        "1.2.840.113556.1.4.319",
        "1.2.840.113556.1.4.473",
        "1.3.6.1.4.1.4203.1.10.1",
        "2.16.840.1.113730.3.4.2",
    )
    assert SECRET not in repr(fields)


def test_controls_on_other_operations() -> None:
    """Controls are decoded for every operation, here a delete with the tree-delete control."""
    pdu = ldaptor_pdu(pureldap.LDAPDelRequest(entry=ENTRY), [(b"1.2.840.113556.1.4.805", True)])
    assert decode_fields(m.DEL_REQUEST, pdu) == RequestFields(
        dn=ENTRY, controls=("1.2.840.113556.1.4.805",)
    )


# -- malformed requests -------------------------------------------------------------------------


def nested_not(depth: int) -> bytes:
    """``depth`` not filters around ``(cn=x)``."""
    element = ava(0xA3, b"cn", b"x")
    for _ in range(depth):
        element = tlv(0xA2, element)
    return element


def test_filter_nesting_up_to_the_limit_decodes() -> None:
    """64 nested not filters are within the limit and decode."""
    assert search_filter(raw_search(nested_not(64))) == "(!" * 64 + "(cn=x)" + ")" * 64


@pytest.mark.parametrize("depth", [65, 5000])
def test_filter_nesting_beyond_the_limit_is_malformed(depth: int) -> None:
    """Nesting deeper than 64 raises BerError, never RecursionError."""
    with pytest.raises(BerError, match="nested"):
        search_filter(raw_search(nested_not(depth)))


def test_deep_and_or_nesting_is_malformed() -> None:
    """The depth limit counts and and or filters too."""
    element = tlv(0x87, b"cn")
    for level in range(65):
        element = tlv(0xA0 if level % 2 else 0xA1, element)
    with pytest.raises(BerError, match="nested"):
        search_filter(raw_search(element))


SUBSTRINGS = tlv(OCTET_STRING, b"cn")

MALFORMED_FILTERS = [
    pytest.param(tlv(0xA2, b""), id="empty-not"),
    pytest.param(tlv(0xA2, tlv(0x87, b"a") + tlv(0x87, b"b")), id="not-with-two"),
    pytest.param(tlv(0xAA, b""), id="unknown-choice"),
    pytest.param(tlv(0xA3, tlv(OCTET_STRING, b"cn")), id="ava-without-value"),
    pytest.param(tlv(0xA3, tlv(OCTET_STRING, b"cn") + tlv(0x80, b"x")), id="ava-bad-value-tag"),
    pytest.param(
        tlv(0xA3, tlv(OCTET_STRING, b"cn") + tlv(OCTET_STRING, b"x") + tlv(OCTET_STRING, b"y")),
        id="ava-trailing",
    ),
    pytest.param(tlv(0xA4, SUBSTRINGS + tlv(SEQUENCE, b"")), id="no-substrings"),
    pytest.param(
        tlv(0xA4, SUBSTRINGS + tlv(SEQUENCE, tlv(0x81, b"a") + tlv(0x80, b"b"))),
        id="initial-not-first",
    ),
    pytest.param(
        tlv(0xA4, SUBSTRINGS + tlv(SEQUENCE, tlv(0x82, b"a") + tlv(0x81, b"b"))),
        id="final-not-last",
    ),
    pytest.param(tlv(0xA4, SUBSTRINGS + tlv(SEQUENCE, tlv(0x83, b"a"))), id="substring-tag"),
    pytest.param(
        tlv(0xA4, tlv(OCTET_STRING, b"userPassword") + tlv(SEQUENCE, tlv(0x83, b"a"))),
        id="secret-substring-tag",
    ),
    pytest.param(tlv(0xA9, tlv(0x82, b"cn")), id="extensible-without-value"),
    pytest.param(tlv(0xA9, tlv(0x83, b"x") + tlv(0x84, b"")), id="extensible-bad-dn"),
    pytest.param(tlv(0xA9, tlv(0x83, b"x") + tlv(0x82, b"cn")), id="extensible-out-of-order"),
]


@pytest.mark.parametrize("element", MALFORMED_FILTERS)
def test_malformed_filters_raise_ber_error(element: bytes) -> None:
    """A filter that breaks RFC 4511's structure raises BerError."""
    with pytest.raises(BerError):
        search_filter(raw_search(element))


MALFORMED_PDUS = [
    pytest.param(
        m.DEL_REQUEST, ldaptor_pdu(pureldap.LDAPDelRequest(entry="cn=x")) + b"\x00", id="trailing"
    ),
    pytest.param(
        m.ABANDON_REQUEST,
        encode_message(1, encode_integer(-1, m.ABANDON_REQUEST)),
        id="abandon-negative",
    ),
    pytest.param(
        m.ABANDON_REQUEST, encode_message(1, tlv(m.ABANDON_REQUEST, b"")), id="abandon-empty"
    ),
    pytest.param(
        m.UNBIND_REQUEST, encode_message(1, tlv(m.UNBIND_REQUEST, b"x")), id="unbind-content"
    ),
    pytest.param(
        m.EXTENDED_REQUEST,
        encode_message(1, tlv(m.EXTENDED_REQUEST, tlv(0x81, b"v"))),
        id="extended-no-name",
    ),
    pytest.param(
        m.DEL_REQUEST,
        encode_message(1, tlv(m.DEL_REQUEST, b"cn=x"), tlv(0xA1, b"")),
        id="controls-bad-tag",
    ),
    pytest.param(
        m.DEL_REQUEST,
        encode_message(
            1, tlv(m.DEL_REQUEST, b"cn=x"), tlv(0xA0, tlv(SEQUENCE, tlv(BOOLEAN, b"\xff")))
        ),
        id="control-without-oid",
    ),
    pytest.param(
        m.BIND_REQUEST,
        encode_message(1, tlv(m.BIND_REQUEST, encode_integer(3) + tlv(OCTET_STRING, b""))),
        id="bind-without-auth",
    ),
    pytest.param(
        m.BIND_REQUEST,
        encode_message(
            1, tlv(m.BIND_REQUEST, encode_integer(3) + tlv(OCTET_STRING, b"") + tlv(0xA3, b""))
        ),
        id="sasl-without-mechanism",
    ),
]


@pytest.mark.parametrize(("op", "pdu"), MALFORMED_PDUS)
def test_malformed_requests_raise_ber_error(op: int, pdu: bytes) -> None:
    """A request that breaks RFC 4511's structure raises BerError."""
    with pytest.raises(BerError):
        decode_fields(op, pdu)


# -- properties ---------------------------------------------------------------------------------

#: One valid PDU of every kind, as clients send them.
VALID_PDUS: list[tuple[int, bytes]] = [
    (
        m.SEARCH_REQUEST,
        ldaptor_search(
            f"(&(uid=bob)(|(userPassword={SECRET})(!(unicodePwd=*{SECRET}*))))",
            attributes=("cn", "*"),
        ),
    ),
    (
        m.SEARCH_REQUEST,
        ldaptor_search(
            r"(|(cn=a*b*c)(!(sn>=x))(cn:dn:2.5.13.5:=\28\29)(objectClass=*)(uid~=y)(n<=3))"
        ),
    ),
    (m.SEARCH_REQUEST, ldap3_search(r"(cn=\ff*)")),
    (m.BIND_REQUEST, ldaptor_pdu(pureldap.LDAPBindRequest(dn=ENTRY, auth=SECRET))),
    (
        m.BIND_REQUEST,
        ldaptor_pdu(pureldap.LDAPBindRequest(auth=("PLAIN", b"\x00bob\x00pw"), sasl=True)),
    ),
    (
        m.MODIFY_REQUEST,
        ldaptor_pdu(delta.ModifyOp(ENTRY, [delta.Replace("mail", ["a", "b"])]).asLDAP()),
    ),
    (
        m.ADD_REQUEST,
        ldaptor_pdu(
            pureldap.LDAPAddRequest(
                entry=ENTRY,
                attributes=[
                    (
                        pureldap.LDAPAttributeDescription("cn"),
                        pureber.BERSet([pureldap.LDAPAttributeValue("bob")]),
                    )
                ],
            )
        ),
    ),
    (m.DEL_REQUEST, ldaptor_pdu(pureldap.LDAPDelRequest(entry=ENTRY), [(b"1.2.3", True, b"v")])),
    (
        m.MODDN_REQUEST,
        ldaptor_pdu(
            pureldap.LDAPModifyDNRequest(
                entry=ENTRY, newrdn="uid=x", deleteoldrdn=1, newSuperior=BASE
            )
        ),
    ),
    (
        m.COMPARE_REQUEST,
        ldaptor_pdu(
            pureldap.LDAPCompareRequest(
                entry=ENTRY,
                ava=pureldap.LDAPAttributeValueAssertion(
                    pureldap.LDAPAttributeDescription("cn"), pureldap.LDAPAssertionValue("x")
                ),
            )
        ),
    ),
    (m.EXTENDED_REQUEST, ldaptor_pdu(pureldap.LDAPPasswordModifyRequest(newPasswd="pw"))),
    (m.ABANDON_REQUEST, ldaptor_pdu(pureldap.LDAPAbandonRequest(id=5))),
    (m.UNBIND_REQUEST, ldaptor_pdu(pureldap.LDAPUnbindRequest())),
]


def test_corpus_pdus_are_valid() -> None:
    """Every PDU the properties below mutate decodes cleanly to begin with."""
    for op, pdu in VALID_PDUS:
        assert isinstance(decode_fields(op, pdu), RequestFields)


def decodes_or_raises_ber_error(op: int, pdu: bytes) -> None:
    """Decode ``pdu``; BerError is an acceptable outcome, any other exception fails."""
    with contextlib.suppress(BerError):
        decode_fields(op, pdu)


@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_truncated_pdus_decode_or_raise_ber_error(data: st.DataObject) -> None:
    """A valid PDU cut short, with or without its envelope length fixed, decodes or raises
    BerError and nothing else."""
    op, pdu = data.draw(st.sampled_from(VALID_PDUS), label="pdu")
    cut = data.draw(st.integers(0, len(pdu) - 1), label="cut")
    decodes_or_raises_ber_error(op, pdu[:cut])
    # Re-wrap the truncated content so the envelope is consistent and the inner reads see it.
    header = 2 if pdu[1] < 0x80 else 2 + (pdu[1] & 0x7F)
    if cut > header:
        decodes_or_raises_ber_error(op, tlv(SEQUENCE, pdu[header:cut]))


@settings(max_examples=1500, deadline=None)
@given(data=st.data())
def test_corrupted_pdus_decode_or_raise_ber_error(data: st.DataObject) -> None:
    """A valid PDU with bytes overwritten, inserted or deleted decodes or raises BerError and
    nothing else."""
    op, pdu = data.draw(st.sampled_from(VALID_PDUS), label="pdu")
    mutated = bytearray(pdu)
    for _ in range(data.draw(st.integers(1, 4), label="edits")):
        position = data.draw(st.integers(0, len(mutated) - 1), label="position")
        kind = data.draw(st.sampled_from(["overwrite", "insert", "delete"]), label="kind")
        byte = data.draw(
            st.one_of(
                st.sampled_from([0x00, 0x7F, 0x80, 0x81, 0x84, 0x85, 0xFF]), st.integers(0, 255)
            ),
            label="byte",
        )
        if kind == "overwrite":
            mutated[position] = byte
        elif kind == "insert":
            mutated.insert(position, byte)
        elif len(mutated) > 1:
            del mutated[position]
    decodes_or_raises_ber_error(op, bytes(mutated))
    # And with the envelope length fixed up, so the mutation reaches the inner decoders.
    header = 2 if pdu[1] < 0x80 else 2 + (pdu[1] & 0x7F)
    decodes_or_raises_ber_error(op, tlv(SEQUENCE, bytes(mutated[header:])))


#: Byte values that make lengths long, huge or indefinite, tags odd and integers extreme.
INTERESTING_BYTES = (0x00, 0x01, 0x04, 0x30, 0x7F, 0x80, 0x81, 0x84, 0x85, 0xFF)


@pytest.mark.parametrize(
    ("op", "pdu"),
    [pytest.param(op, pdu, id=f"{i}-0x{op:02x}") for i, (op, pdu) in enumerate(VALID_PDUS)],
)
def test_every_single_byte_corruption_decodes_or_raises_ber_error(op: int, pdu: bytes) -> None:
    """Overwriting, deleting or duplicating any one byte of a valid PDU, with the envelope
    length fixed up, decodes or raises BerError and nothing else."""
    header = 2 if pdu[1] < 0x80 else 2 + (pdu[1] & 0x7F)
    content = pdu[header:]
    for position in range(len(content)):
        variants = [content[:position] + content[position + 1 :]]  # deleted
        variants.append(content[: position + 1] + content[position:])  # duplicated
        variants += [
            content[:position] + bytes((byte,)) + content[position + 1 :]
            for byte in INTERESTING_BYTES
        ]
        for variant in variants:
            decodes_or_raises_ber_error(op, tlv(SEQUENCE, variant))


# Values: any Unicode text (no lone surrogates, which have no UTF-8 form), specials included.
_values = st.text(
    st.one_of(st.sampled_from("*()\\\x00 aé"), st.characters(codec="utf-8")),
    max_size=8,
)
_attributes = st.sampled_from(["cn", "sn", "mail", "objectClass", "cn;lang-en", "2.5.4.3"])


def _ava(cls: Any) -> Any:
    return st.builds(
        lambda a, v: cls(
            attributeDesc=pureldap.LDAPAttributeDescription(a),
            assertionValue=pureldap.LDAPAssertionValue(v),
        ),
        _attributes,
        _values,
    )


@st.composite
def _substrings(draw: st.DrawFn) -> Any:
    items = []
    if draw(st.booleans()):
        items.append(pureldap.LDAPFilter_substrings_initial(draw(_values.filter(bool))))
    for value in draw(st.lists(_values.filter(bool), max_size=3)):
        items.append(pureldap.LDAPFilter_substrings_any(value))
    if not items or draw(st.booleans()):
        items.append(pureldap.LDAPFilter_substrings_final(draw(_values.filter(bool))))
    return pureldap.LDAPFilter_substrings(type=draw(_attributes), substrings=items)


@st.composite
def _extensible(draw: st.DrawFn) -> Any:
    rule = draw(st.one_of(st.none(), st.sampled_from(["2.5.13.5", "caseIgnoreMatch"])))
    attribute = draw(_attributes if rule is None else st.one_of(st.none(), _attributes))
    return pureldap.LDAPFilter_extensibleMatch(
        matchingRule=rule,
        type=attribute,
        matchValue=draw(_values),
        dnAttributes=draw(st.booleans()),
    )


_simple_filters = st.one_of(
    _ava(pureldap.LDAPFilter_equalityMatch),
    _ava(pureldap.LDAPFilter_greaterOrEqual),
    _ava(pureldap.LDAPFilter_lessOrEqual),
    _ava(pureldap.LDAPFilter_approxMatch),
    _attributes.map(pureldap.LDAPFilter_present),
    _substrings(),
    _extensible(),
)
_filters = st.recursive(
    _simple_filters,
    lambda inner: st.one_of(
        st.lists(inner, min_size=1, max_size=3).map(pureldap.LDAPFilter_and),
        st.lists(inner, min_size=1, max_size=3).map(pureldap.LDAPFilter_or),
        inner.map(pureldap.LDAPFilter_not),
    ),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(_filters)
def test_ldaptor_filter_text_round_trips(ldap_filter: Any) -> None:
    """For filters on UTF-8 values, the decoded string is exactly ldaptor's own ``asText()``,
    except that an extensible match without a type has its value redacted."""
    pdu = ldaptor_pdu(pureldap.LDAPSearchRequest(baseObject=BASE, filter=ldap_filter))
    expected = re.sub(r"\(:((dn:)?[^:()=]*):=[^()]*\)", r"(:\1:=***)", ldap_filter.asText())
    assert search_filter(pdu) == expected
