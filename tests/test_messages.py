"""Unit tests for ldapproxy.messages: the PDUs the proxy builds and the fields it reads.

Encodings are cross-checked with an independent decoder (ldap3's pyasn1 ASN.1 schema, and
ldaptor for the Notice of Disconnection).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
from support.fakes import abandon_request, request, search_request

from ldapproxy import messages as m
from ldapproxy.ber import (
    ENUMERATED,
    OCTET_STRING,
    BerError,
    Frame,
    Framer,
    encode_integer,
    encode_length,
    encode_message,
    read_tlv,
    tlv,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from ldap3.protocol.rfc4511 import LDAPMessage
    from ldaptor.protocols import pureber, pureldap
    from pyasn1.codec.ber import decoder as asn1_decoder


def ldap3_decode(pdu: bytes) -> Any:
    """Decode one LDAPMessage with ldap3's schema; fails on trailing bytes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        message, rest = asn1_decoder.decode(pdu, asn1Spec=LDAPMessage())
    assert rest == b""
    return message


def ldaptor_decode(pdu: bytes) -> Any:
    """Decode one LDAPMessage with ldaptor, as its LDAP client does."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context = pureldap.LDAPBERDecoderContext_TopLevel(
            inherit=pureldap.LDAPBERDecoderContext_LDAPMessage(
                fallback=pureldap.LDAPBERDecoderContext(fallback=pureber.BERDecoderContext()),
                inherit=pureldap.LDAPBERDecoderContext(fallback=pureber.BERDecoderContext()),
            )
        )
        message, used = pureber.berDecodeObject(context, pdu)
    assert used == len(pdu)
    return message


def frame(pdu: bytes) -> Frame:
    """The one frame in ``pdu``."""
    framer = Framer(1 << 20)
    frames = framer.feed(pdu)
    assert len(frames) == 1
    assert framer.buffered == 0
    return frames[0]


# -- error_for_request ----------------------------------------------------------------------

#: request tag -> (response tag, ldap3's name for the response choice)
RESPONSES = [
    pytest.param(m.BIND_REQUEST, m.BIND_RESPONSE, "bindResponse", id="bind"),
    pytest.param(m.SEARCH_REQUEST, m.SEARCH_RESULT_DONE, "searchResDone", id="search"),
    pytest.param(m.MODIFY_REQUEST, m.MODIFY_RESPONSE, "modifyResponse", id="modify"),
    pytest.param(m.ADD_REQUEST, m.ADD_RESPONSE, "addResponse", id="add"),
    pytest.param(m.DEL_REQUEST, m.DEL_RESPONSE, "delResponse", id="delete"),
    pytest.param(m.MODDN_REQUEST, m.MODDN_RESPONSE, "modDNResponse", id="modrdn"),
    pytest.param(m.COMPARE_REQUEST, m.COMPARE_RESPONSE, "compareResponse", id="compare"),
    pytest.param(m.EXTENDED_REQUEST, m.EXTENDED_RESPONSE, "extendedResp", id="extended"),
]


@pytest.mark.parametrize(("request_op", "response_op", "asn1_name"), RESPONSES)
def test_error_for_request_answers_with_the_matching_response_type(
    request_op: int, response_op: int, asn1_name: str
) -> None:
    """Each request type is failed with its own response type, code and diagnostic."""
    pdu = m.error_for_request(1234, request_op, m.CONFIDENTIALITY_REQUIRED, "use StartTLS")
    assert pdu is not None
    assert frame(pdu)[:2] == (1234, response_op)
    assert m.result_code(pdu) == m.CONFIDENTIALITY_REQUIRED
    decoded = ldap3_decode(pdu)
    assert int(decoded["messageID"]) == 1234
    op = decoded["protocolOp"]
    assert op.getName() == asn1_name
    result = op.getComponent()
    assert int(result["resultCode"]) == m.CONFIDENTIALITY_REQUIRED
    assert str(result["matchedDN"]) == ""
    assert str(result["diagnosticMessage"]) == "use StartTLS"


@pytest.mark.parametrize(("request_op", "response_op", "asn1_name"), RESPONSES)
def test_request_and_response_tags_agree_with_ldap3(
    request_op: int, response_op: int, asn1_name: str
) -> None:
    """The request tag constants are the tags of the requests ldap3 decodes as such."""
    pdu = request(3, request_op)
    assert frame(pdu).op == request_op
    want = asn1_name.replace("Response", "Request").replace("ResDone", "Request")
    want = {"extendedResp": "extendedReq"}.get(asn1_name, want)
    assert ldap3_decode(pdu)["protocolOp"].getName() == want


@pytest.mark.parametrize(
    "request_op",
    [m.ABANDON_REQUEST, m.UNBIND_REQUEST, 0x99, m.SEARCH_RESULT_ENTRY, m.BIND_RESPONSE],
    ids=["abandon", "unbind", "unknown", "entry", "bind-response"],
)
def test_error_for_request_is_none_for_requests_without_a_response(request_op: int) -> None:
    """Abandon, Unbind and tags that are not requests cannot be answered."""
    assert m.error_for_request(1, request_op, m.UNAVAILABLE, "x") is None


def test_error_for_extended_request_has_no_response_name() -> None:
    """The ExtendedResponse that fails an ExtendedRequest carries no responseName."""
    pdu = m.error_for_request(2, m.EXTENDED_REQUEST, m.UNAVAILABLE, "down")
    assert pdu is not None
    assert m.extended_response_name(pdu) is None
    assert not ldap3_decode(pdu)["protocolOp"].getComponent()["responseName"].hasValue()


def test_diagnostic_message_is_utf8() -> None:
    """The diagnosticMessage is the UTF-8 encoding of the text given."""
    pdu = m.result_message(1, m.BIND_RESPONSE, m.OTHER, "größe")
    result = ldap3_decode(pdu)["protocolOp"].getComponent()
    assert bytes(result["diagnosticMessage"]) == "größe".encode()


# -- Notice of Disconnection and other extended PDUs ---------------------------------------


def test_notice_of_disconnection_is_unsolicited_with_its_oid() -> None:
    """The notice has message ID 0, the 1.3.6.1.4.1.1466.20036 name, the code and text."""
    pdu = m.notice_of_disconnection(m.PROTOCOL_ERROR, "malformed LDAP message")
    assert frame(pdu)[:2] == (0, m.EXTENDED_RESPONSE)
    assert m.extended_response_name(pdu) == b"1.3.6.1.4.1.1466.20036"
    assert m.result_code(pdu) == m.PROTOCOL_ERROR
    decoded = ldap3_decode(pdu)
    assert int(decoded["messageID"]) == 0
    response = decoded["protocolOp"].getComponent()
    assert str(response["responseName"]) == "1.3.6.1.4.1.1466.20036"
    assert int(response["resultCode"]) == m.PROTOCOL_ERROR
    assert str(response["diagnosticMessage"]) == "malformed LDAP message"
    other = ldaptor_decode(pdu)
    assert other.id == 0
    assert isinstance(other.value, pureldap.LDAPExtendedResponse)
    assert other.value.resultCode == m.PROTOCOL_ERROR


def test_extended_request_carries_name_and_optional_value() -> None:
    """extended_request puts requestName [0] and requestValue [1] where ldap3 finds them."""
    bare = ldap3_decode(m.extended_request(4, m.STARTTLS_OID))["protocolOp"].getComponent()
    assert str(bare["requestName"]) == m.STARTTLS_OID.decode()
    assert not bare["requestValue"].hasValue()
    valued = m.extended_request(5, m.WHOAMI_OID, b"\x01\x02")
    decoded = ldap3_decode(valued)["protocolOp"].getComponent()
    assert bytes(decoded["requestValue"]) == b"\x01\x02"


def test_unbind_request_decodes_as_unbind() -> None:
    """unbind_request is an UnbindRequest with the given message ID."""
    decoded = ldap3_decode(m.unbind_request(77))
    assert int(decoded["messageID"]) == 77
    assert decoded["protocolOp"].getName() == "unbindRequest"


def test_root_dse_search_is_a_base_object_present_filter_search() -> None:
    """root_dse_search reads the root DSE: empty base, base scope, (objectClass=*)."""
    pdu = m.root_dse_search(8, (b"supportedExtension", b"namingContexts"))
    search = ldap3_decode(pdu)["protocolOp"].getComponent()
    assert str(search["baseObject"]) == ""
    assert str(search["scope"]) == "baseObject"
    assert str(search["filter"]["present"]) == "objectClass"
    assert [str(a) for a in search["attributes"]] == ["supportedExtension", "namingContexts"]
    assert m.is_root_dse_read(pdu)


# -- readers on well-formed PDUs ------------------------------------------------------------


@pytest.mark.parametrize("oid", [m.STARTTLS_OID, m.WHOAMI_OID, b"1.2.3"])
def test_extended_request_name_reads_the_oid(oid: bytes) -> None:
    """extended_request_name returns the requestName, with or without a value."""
    assert m.extended_request_name(m.extended_request(1, oid)) == oid
    assert m.extended_request_name(m.extended_request(1, oid, b"v")) == oid


def test_extended_response_name_skips_a_referral() -> None:
    """The responseName is found after an optional referral [3] in the LDAPResult."""
    body = (
        encode_integer(m.SUCCESS, ENUMERATED)
        + tlv(OCTET_STRING, b"")
        + tlv(OCTET_STRING, b"")
        + tlv(0xA3, tlv(OCTET_STRING, b"ldap://elsewhere/"))
        + tlv(0x8A, b"1.2.3.4")
        + tlv(0x8B, b"value")
    )
    pdu = encode_message(3, tlv(m.EXTENDED_RESPONSE, body))
    assert m.extended_response_name(pdu) == b"1.2.3.4"
    assert str(ldap3_decode(pdu)["protocolOp"].getComponent()["responseName"]) == "1.2.3.4"


def test_extended_response_name_is_none_with_only_a_value() -> None:
    """An ExtendedResponse with a responseValue [11] but no name has no name."""
    body = (
        encode_integer(m.SUCCESS, ENUMERATED)
        + tlv(OCTET_STRING, b"")
        + tlv(OCTET_STRING, b"")
        + tlv(0x8B, b"v")
    )
    pdu = encode_message(3, tlv(m.EXTENDED_RESPONSE, body))
    assert m.extended_response_name(pdu) is None


@pytest.mark.parametrize("code", [0, 1, 2, 13, 49, 52, 80, 121, 4096])
def test_result_code_reads_every_code(code: int) -> None:
    """result_code returns the resultCode of any response carrying an LDAPResult."""
    assert m.result_code(m.result_message(1, m.MODIFY_RESPONSE, code, "")) == code
    assert m.result_code(m.extended_response(1, code, "", b"1.2")) == code


@pytest.mark.parametrize(
    ("pdu", "expected"),
    [
        pytest.param(m.root_dse_search(1), True, id="root-dse"),
        pytest.param(search_request(1, base=b"", scope=0), True, id="root-dse-built"),
        pytest.param(search_request(1, base=b"", scope=1), False, id="one-level"),
        pytest.param(search_request(1, base=b"", scope=2), False, id="subtree"),
        pytest.param(search_request(1, base=b"dc=example", scope=0), False, id="other-base"),
        pytest.param(search_request(1, base=b"cn=Subschema", scope=0), False, id="subschema"),
        pytest.param(m.extended_request(1, m.WHOAMI_OID), False, id="not-a-search"),
        pytest.param(m.unbind_request(1), False, id="unbind"),
        pytest.param(
            encode_message(1, tlv(m.SEARCH_REQUEST, tlv(0x80, b"") + encode_integer(0, 0x0A))),
            False,
            id="base-not-octet-string",
        ),
        pytest.param(
            encode_message(1, tlv(m.SEARCH_REQUEST, tlv(OCTET_STRING, b"") + encode_integer(0))),
            False,
            id="scope-not-enumerated",
        ),
    ],
)
def test_is_root_dse_read(pdu: bytes, expected: bool) -> None:
    """Only a base-scope search of the empty DN is a root DSE read."""
    assert m.is_root_dse_read(pdu) is expected


def _bind(name: bytes, auth: bytes) -> bytes:
    return encode_message(
        1, tlv(m.BIND_REQUEST, encode_integer(3) + tlv(OCTET_STRING, name) + auth)
    )


@pytest.mark.parametrize(
    ("pdu", "expected"),
    [
        pytest.param(_bind(b"", tlv(0x80, b"")), True, id="anonymous"),
        pytest.param(_bind(b"cn=admin", tlv(0x80, b"secret")), False, id="simple"),
        pytest.param(_bind(b"cn=admin", tlv(0x80, b"")), False, id="unauthenticated"),
        pytest.param(_bind(b"", tlv(0x80, b"secret")), False, id="empty-name-password"),
        pytest.param(
            _bind(b"", tlv(0xA3, tlv(OCTET_STRING, b"EXTERNAL"))), False, id="sasl-external"
        ),
        pytest.param(m.root_dse_search(1), False, id="not-a-bind"),
    ],
)
def test_is_anonymous_bind(pdu: bytes, expected: bool) -> None:
    """Only a simple bind with an empty name and an empty password is anonymous."""
    assert m.is_anonymous_bind(pdu) is expected


@pytest.mark.parametrize("length", range(len(_bind(b"", tlv(0x80, b"")))))
def test_is_anonymous_bind_rejects_truncation(length: int) -> None:
    """is_anonymous_bind raises BerError on a truncated bind rather than guessing."""
    with pytest.raises(BerError):
        m.is_anonymous_bind(_bind(b"", tlv(0x80, b""))[:length])


@pytest.mark.parametrize("target", [1, 127, 128, 2**31 - 1])
def test_abandon_target_reads_the_abandoned_id(target: int) -> None:
    """abandon_target returns the message ID an AbandonRequest names."""
    pdu = abandon_request(9, target)
    assert m.abandon_target(pdu) == target
    assert int(ldap3_decode(pdu)["protocolOp"].getComponent()) == target


# -- readers on malformed PDUs --------------------------------------------------------------

READERS: list[tuple[str, Callable[[bytes], object], bytes]] = [
    ("extended_request_name", m.extended_request_name, m.extended_request(3, m.STARTTLS_OID)),
    ("extended_response_name", m.extended_response_name, m.notice_of_disconnection(2, "bye")),
    ("result_code", m.result_code, m.result_message(3, m.BIND_RESPONSE, 49, "no")),
    ("is_root_dse_read", m.is_root_dse_read, m.root_dse_search(3, (b"cn",))),
    ("abandon_target", m.abandon_target, abandon_request(4, 3)),
]


@pytest.mark.parametrize(("reader", "pdu"), [pytest.param(r, p, id=name) for name, r, p in READERS])
def test_readers_reject_every_truncation(reader: Callable[[bytes], object], pdu: bytes) -> None:
    """Each reader raises BerError on its PDU cut short at any length."""
    reader(pdu)  # the whole PDU is fine
    for length in range(len(pdu)):
        with pytest.raises(BerError):
            reader(pdu[:length])


def _op_content(pdu: bytes) -> tuple[int, bytes]:
    """The protocolOp tag and content octets of a short PDU."""
    _, start, end = read_tlv(pdu, 0, len(pdu))
    _, _, id_end = read_tlv(pdu, start, end)
    tag, op_start, op_end = read_tlv(pdu, id_end, end)
    return tag, pdu[op_start:op_end]


#: Constructed ops, and how many leading elements of their content each reader needs.
INNER = [
    pytest.param(m.extended_request_name, m.extended_request(3, m.STARTTLS_OID), 1, id="ext-req"),
    pytest.param(m.extended_response_name, m.notice_of_disconnection(2, "bye"), 3, id="ext-resp"),
    pytest.param(m.result_code, m.result_message(3, m.BIND_RESPONSE, 49, "no"), 1, id="result"),
    pytest.param(m.is_root_dse_read, m.root_dse_search(3, (b"cn",)), 2, id="root-dse"),
]


@pytest.mark.parametrize(("reader", "pdu", "needed"), INNER)
def test_readers_reject_truncated_op_content_inside_a_consistent_envelope(
    reader: Callable[[bytes], object], pdu: bytes, needed: int
) -> None:
    """A reader raises BerError when the protocolOp ends inside an element it must read."""
    op_tag, content = _op_content(pdu)
    end = 0
    for _ in range(needed):
        end = read_tlv(content, end, len(content))[2]
    for length in range(end):
        cut = content[:length]
        # Envelope and protocolOp lengths are correct: only the inner element is short.
        truncated = encode_message(1, bytes((op_tag,)) + encode_length(len(cut)) + cut)
        with pytest.raises(BerError):
            reader(truncated)


@pytest.mark.parametrize(
    ("reader", "pdu", "words"),
    [
        pytest.param(
            m.extended_request_name, m.root_dse_search(1), "not an ExtendedRequest", id="ext-req"
        ),
        pytest.param(
            m.extended_request_name,
            encode_message(1, tlv(m.EXTENDED_REQUEST, tlv(0x81, b"value"))),
            "requestName",
            id="ext-req-without-name",
        ),
        pytest.param(
            m.extended_response_name,
            m.result_message(1, m.BIND_RESPONSE, 0, ""),
            "not an ExtendedResponse",
            id="ext-resp",
        ),
        pytest.param(
            m.extended_response_name,
            encode_message(1, tlv(m.EXTENDED_RESPONSE, encode_integer(0, ENUMERATED))),
            "truncated",
            id="ext-resp-short-result",
        ),
        pytest.param(
            m.result_code,
            encode_message(1, tlv(m.BIND_RESPONSE, tlv(OCTET_STRING, b""))),
            "resultCode",
            id="result-not-enumerated",
        ),
        pytest.param(
            m.result_code,
            encode_message(1, tlv(m.BIND_RESPONSE, tlv(ENUMERATED, b""))),
            "size",
            id="result-empty-enumerated",
        ),
        pytest.param(m.abandon_target, m.unbind_request(1), "not an AbandonRequest", id="abn"),
        pytest.param(
            m.abandon_target,
            encode_message(1, bytes((m.ABANDON_REQUEST, 0))),
            "size",
            id="abandon-empty",
        ),
        pytest.param(
            m.extended_request_name,
            encode_message(1, tlv(m.EXTENDED_REQUEST, b"\x80\x10short")),
            "overruns",
            id="name-overruns-op",
        ),
    ],
)
def test_readers_reject_malformed_pdus(
    reader: Callable[[bytes], object], pdu: bytes, words: str
) -> None:
    """Each reader raises BerError naming what is wrong with a PDU of the wrong shape."""
    with pytest.raises(BerError, match=words):
        reader(pdu)


def test_result_name() -> None:
    """result_name gives RFC names, and "other" for unknown codes."""
    assert m.result_name(13) == "confidentialityRequired"
    assert m.result_name(52) == "unavailable"
    assert m.result_name(9999) == "other"
