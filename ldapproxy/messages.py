"""LDAP protocol vocabulary: operation tags, result codes, and the few PDUs the proxy
builds or inspects itself.

Everything else passes through as raw bytes (see :mod:`ldapproxy.ber`).  The decoders here
read only the fields the proxy acts on, with bounds checks, and never trust a length.
"""

from __future__ import annotations

from ldapproxy.ber import (
    BOOLEAN,
    ENUMERATED,
    OCTET_STRING,
    SEQUENCE,
    BerError,
    encode_integer,
    encode_message,
    read_integer,
    read_tlv,
    tlv,
)
from ldapproxy.ber import (
    INTEGER as INTEGER_TAG,
)

# -- protocolOp tags (RFC 4511 §4.2 - §4.14), as the first octet of the element ----------

BIND_REQUEST = 0x60
BIND_RESPONSE = 0x61
UNBIND_REQUEST = 0x42
SEARCH_REQUEST = 0x63
SEARCH_RESULT_ENTRY = 0x64
SEARCH_RESULT_DONE = 0x65
SEARCH_RESULT_REFERENCE = 0x73
MODIFY_REQUEST = 0x66
MODIFY_RESPONSE = 0x67
ADD_REQUEST = 0x68
ADD_RESPONSE = 0x69
DEL_REQUEST = 0x4A
DEL_RESPONSE = 0x6B
MODDN_REQUEST = 0x6C
MODDN_RESPONSE = 0x6D
COMPARE_REQUEST = 0x6E
COMPARE_RESPONSE = 0x6F
ABANDON_REQUEST = 0x50
EXTENDED_REQUEST = 0x77
EXTENDED_RESPONSE = 0x78
INTERMEDIATE_RESPONSE = 0x79

#: Operation names, shared by logs, metrics and the plugin API.
REQUEST_NAMES: dict[int, str] = {
    BIND_REQUEST: "bind",
    UNBIND_REQUEST: "unbind",
    SEARCH_REQUEST: "search",
    MODIFY_REQUEST: "modify",
    ADD_REQUEST: "add",
    DEL_REQUEST: "delete",
    MODDN_REQUEST: "modrdn",
    COMPARE_REQUEST: "compare",
    ABANDON_REQUEST: "abandon",
    EXTENDED_REQUEST: "extended",
}

#: The response that completes each request that has one.
RESPONSE_FOR_REQUEST: dict[int, int] = {
    BIND_REQUEST: BIND_RESPONSE,
    SEARCH_REQUEST: SEARCH_RESULT_DONE,
    MODIFY_REQUEST: MODIFY_RESPONSE,
    ADD_REQUEST: ADD_RESPONSE,
    DEL_REQUEST: DEL_RESPONSE,
    MODDN_REQUEST: MODDN_RESPONSE,
    COMPARE_REQUEST: COMPARE_RESPONSE,
    EXTENDED_REQUEST: EXTENDED_RESPONSE,
}

#: Responses that end an operation.  Entries, references and intermediate responses don't.
FINAL_RESPONSES: frozenset[int] = frozenset(RESPONSE_FOR_REQUEST.values())

#: Every tag that only a server may send.  A client sending one is broken.
RESPONSE_TAGS: frozenset[int] = FINAL_RESPONSES | {
    SEARCH_RESULT_ENTRY,
    SEARCH_RESULT_REFERENCE,
    INTERMEDIATE_RESPONSE,
}

# -- OIDs ----------------------------------------------------------------------------------

STARTTLS_OID = b"1.3.6.1.4.1.1466.20037"
NOTICE_OF_DISCONNECTION_OID = b"1.3.6.1.4.1.1466.20036"
WHOAMI_OID = b"1.3.6.1.4.1.4203.1.11.3"
PASSWORD_MODIFY_OID = b"1.3.6.1.4.1.4203.1.11.1"
CANCEL_OID = b"1.3.6.1.1.8"
REFRESH_OID = b"1.3.6.1.4.1.1466.101.119.1"

PAGED_RESULTS_OID = b"1.2.840.113556.1.4.319"

# -- result codes (RFC 4511 Appendix A, plus the cancel codes of RFC 3909) -------------------

SUCCESS = 0
OPERATIONS_ERROR = 1
PROTOCOL_ERROR = 2
ADMIN_LIMIT_EXCEEDED = 11
CONFIDENTIALITY_REQUIRED = 13
SASL_BIND_IN_PROGRESS = 14
BUSY = 51
UNAVAILABLE = 52
UNWILLING_TO_PERFORM = 53
OTHER = 80

RESULT_NAMES: dict[int, str] = {
    0: "success",
    1: "operationsError",
    2: "protocolError",
    3: "timeLimitExceeded",
    4: "sizeLimitExceeded",
    5: "compareFalse",
    6: "compareTrue",
    7: "authMethodNotSupported",
    8: "strongerAuthRequired",
    10: "referral",
    11: "adminLimitExceeded",
    12: "unavailableCriticalExtension",
    13: "confidentialityRequired",
    14: "saslBindInProgress",
    16: "noSuchAttribute",
    17: "undefinedAttributeType",
    18: "inappropriateMatching",
    19: "constraintViolation",
    20: "attributeOrValueExists",
    21: "invalidAttributeSyntax",
    32: "noSuchObject",
    33: "aliasProblem",
    34: "invalidDNSyntax",
    36: "aliasDereferencingProblem",
    48: "inappropriateAuthentication",
    49: "invalidCredentials",
    50: "insufficientAccessRights",
    51: "busy",
    52: "unavailable",
    53: "unwillingToPerform",
    54: "loopDetect",
    64: "namingViolation",
    65: "objectClassViolation",
    66: "notAllowedOnNonLeaf",
    67: "notAllowedOnRDN",
    68: "entryAlreadyExists",
    69: "objectClassModsProhibited",
    71: "affectsMultipleDSAs",
    80: "other",
    118: "canceled",
    119: "noSuchOperation",
    120: "tooLate",
    121: "cannotCancel",
}


def result_name(code: int) -> str:
    """The RFC name of a result code, or ``"other"`` for codes outside the standard set."""
    return RESULT_NAMES.get(code, "other")


# -- building PDUs -------------------------------------------------------------------------


def _ldap_result(code: int, diagnostic: str, matched_dn: bytes = b"") -> bytes:
    return (
        encode_integer(code, ENUMERATED)
        + tlv(OCTET_STRING, matched_dn)
        + tlv(OCTET_STRING, diagnostic.encode("utf-8"))
    )


def result_message(message_id: int, response_tag: int, code: int, diagnostic: str) -> bytes:
    """A complete response PDU of type ``response_tag`` carrying an LDAPResult."""
    return encode_message(message_id, tlv(response_tag, _ldap_result(code, diagnostic)))


def extended_response(
    message_id: int, code: int, diagnostic: str, response_name: bytes | None = None
) -> bytes:
    """An ExtendedResponse, with the optional responseName [10]."""
    body = _ldap_result(code, diagnostic)
    if response_name is not None:
        body += tlv(0x8A, response_name)
    return encode_message(message_id, tlv(EXTENDED_RESPONSE, body))


def error_for_request(message_id: int, request_op: int, code: int, diagnostic: str) -> bytes | None:
    """The response of the right type that fails request ``request_op`` with ``code``.

    Returns ``None`` for requests that have no response (Abandon, Unbind) and for tags the
    proxy does not know, which cannot be answered.
    """
    response = RESPONSE_FOR_REQUEST.get(request_op)
    if response is None:
        return None
    if response == EXTENDED_RESPONSE:
        return extended_response(message_id, code, diagnostic)
    return result_message(message_id, response, code, diagnostic)


def notice_of_disconnection(code: int, diagnostic: str) -> bytes:
    """The unsolicited Notice of Disconnection (RFC 4511 §4.4.1)."""
    return extended_response(0, code, diagnostic, NOTICE_OF_DISCONNECTION_OID)


def extended_request(message_id: int, oid: bytes, value: bytes | None = None) -> bytes:
    """An ExtendedRequest with ``requestName`` ``oid`` and an optional value."""
    body = tlv(0x80, oid)
    if value is not None:
        body += tlv(0x81, value)
    return encode_message(message_id, tlv(EXTENDED_REQUEST, body))


def anonymous_bind_request(message_id: int) -> bytes:
    """An anonymous simple BindRequest (RFC 4513 §5.1.1): version 3, empty name and password."""
    body = encode_integer(3) + tlv(OCTET_STRING, b"") + tlv(0x80, b"")
    return encode_message(message_id, tlv(BIND_REQUEST, body))


def unbind_request(message_id: int) -> bytes:
    """An UnbindRequest."""
    return encode_message(message_id, bytes((UNBIND_REQUEST, 0)))


def root_dse_search(message_id: int, attributes: tuple[bytes, ...] = ()) -> bytes:
    """A base-scope search of the root DSE with filter ``(objectClass=*)``."""
    body = (
        tlv(OCTET_STRING, b"")  # baseObject
        + encode_integer(0, ENUMERATED)  # scope: baseObject
        + encode_integer(0, ENUMERATED)  # derefAliases: never
        + encode_integer(0)  # sizeLimit
        + encode_integer(0)  # timeLimit
        + tlv(BOOLEAN, b"\x00")  # typesOnly
        + tlv(0x87, b"objectClass")  # filter: present
        + tlv(SEQUENCE, b"".join(tlv(OCTET_STRING, a) for a in attributes))
    )
    return encode_message(message_id, tlv(SEARCH_REQUEST, body))


# -- reading the fields the proxy acts on ---------------------------------------------------


def _protocol_op(pdu: bytes) -> tuple[int, int, int]:
    """Locate the protocolOp element: ``(tag, value_start, value_end)``."""
    _, start, end = read_tlv(pdu, 0, len(pdu))
    _, _, id_end = read_tlv(pdu, start, end)
    return read_tlv(pdu, id_end, end)


def extended_request_name(pdu: bytes) -> bytes:
    """The requestName OID of an ExtendedRequest PDU.

    :raises BerError: the PDU is not a well-formed ExtendedRequest.
    """
    tag, start, end = _protocol_op(pdu)
    if tag != EXTENDED_REQUEST:
        raise BerError("not an ExtendedRequest")
    name_tag, name_start, name_end = read_tlv(pdu, start, end)
    if name_tag != 0x80:
        raise BerError("ExtendedRequest without requestName")
    return pdu[name_start:name_end]


def extended_response_name(pdu: bytes) -> bytes | None:
    """The responseName of an ExtendedResponse PDU, if it has one."""
    tag, start, end = _protocol_op(pdu)
    if tag != EXTENDED_RESPONSE:
        raise BerError("not an ExtendedResponse")
    pos = start
    for _ in range(3):  # resultCode, matchedDN, diagnosticMessage
        pos = read_tlv(pdu, pos, end)[2]
    while pos < end:
        element_tag, value_start, value_end = read_tlv(pdu, pos, end)
        if element_tag == 0x8A:
            return pdu[value_start:value_end]
        pos = value_end
    return None


def result_code(pdu: bytes) -> int:
    """The resultCode of a response PDU that carries an LDAPResult."""
    _, start, end = _protocol_op(pdu)
    tag, value_start, value_end = read_tlv(pdu, start, end)
    if tag != ENUMERATED:
        raise BerError("response does not start with a resultCode")
    return read_integer(pdu, value_start, value_end)


def is_root_dse_read(pdu: bytes) -> bool:
    """Whether a SearchRequest PDU is a base-scope search of the root DSE."""
    tag, start, end = _protocol_op(pdu)
    if tag != SEARCH_REQUEST:
        return False
    base_tag, base_start, base_end = read_tlv(pdu, start, end)
    if base_tag != OCTET_STRING or base_end != base_start:
        return False
    scope_tag, scope_start, scope_end = read_tlv(pdu, base_end, end)
    return scope_tag == ENUMERATED and read_integer(pdu, scope_start, scope_end) == 0


def is_anonymous_bind(pdu: bytes) -> bool:
    """Whether a BindRequest PDU is an anonymous simple bind (RFC 4513 §5.1.1): an empty
    name and an empty simple password."""
    tag, start, end = _protocol_op(pdu)
    if tag != BIND_REQUEST:
        return False
    _, _, version_end = read_tlv(pdu, start, end)
    name_tag, name_start, name_end = read_tlv(pdu, version_end, end)
    if name_tag != OCTET_STRING or name_end != name_start:
        return False
    auth_tag, auth_start, auth_end = read_tlv(pdu, name_end, end)
    return auth_tag == 0x80 and auth_end == auth_start


def request_control_oids(pdu: bytes) -> list[bytes]:
    """The controlType of every control on an LDAPMessage, in order (usually none)."""
    _, start, end = read_tlv(pdu, 0, len(pdu))
    _, _, id_end = read_tlv(pdu, start, end)
    _, _, op_end = read_tlv(pdu, id_end, end)
    if op_end == end:
        return []
    tag, pos, controls_end = read_tlv(pdu, op_end, end)
    if tag != 0xA0:
        raise BerError("expected [0] Controls after the protocolOp")
    oids = []
    while pos < controls_end:
        _, control_start, control_end = read_tlv(pdu, pos, controls_end)
        oid_tag, oid_start, oid_end = read_tlv(pdu, control_start, control_end)
        if oid_tag != OCTET_STRING:
            raise BerError("control without a controlType")
        oids.append(pdu[oid_start:oid_end])
        pos = control_end
    return oids


def paged_results_cookie(pdu: bytes) -> bytes | None:
    """The cookie of the paged-results control (RFC 2696) on a response, if it has one."""
    _, start, end = read_tlv(pdu, 0, len(pdu))
    _, _, id_end = read_tlv(pdu, start, end)
    _, _, op_end = read_tlv(pdu, id_end, end)
    if op_end == end:
        return None
    _, pos, controls_end = read_tlv(pdu, op_end, end)
    while pos < controls_end:
        _, control_start, control_end = read_tlv(pdu, pos, controls_end)
        _, oid_start, oid_end = read_tlv(pdu, control_start, control_end)
        if pdu[oid_start:oid_end] == PAGED_RESULTS_OID:
            element = oid_end
            while element < control_end:
                tag, value_start, value_end = read_tlv(pdu, element, control_end)
                if tag == OCTET_STRING:
                    _, seq_start, seq_end = read_tlv(pdu, value_start, value_end)
                    _, _, size_end = read_tlv(pdu, seq_start, seq_end)
                    _, cookie_start, cookie_end = read_tlv(pdu, size_end, seq_end)
                    return pdu[cookie_start:cookie_end]
                element = value_end
            return None
        pos = control_end
    return None


def is_simple_bind(pdu: bytes) -> bool:
    """Whether a PDU is a version 3 BindRequest with simple authentication (``simple [0]``)."""
    tag, start, end = _protocol_op(pdu)
    if tag != BIND_REQUEST:
        return False
    version_tag, version_start, version_end = read_tlv(pdu, start, end)
    if version_tag != INTEGER_TAG or read_integer(pdu, version_start, version_end) != 3:
        return False
    name_tag, _, name_end = read_tlv(pdu, version_end, end)
    auth_tag, _, _ = read_tlv(pdu, name_end, end)
    return name_tag == OCTET_STRING and auth_tag == 0x80


def is_sasl_bind(pdu: bytes) -> bool:
    """Whether a BindRequest PDU uses SASL authentication (``sasl [3]``)."""
    tag, start, end = _protocol_op(pdu)
    if tag != BIND_REQUEST:
        return False
    _, _, version_end = read_tlv(pdu, start, end)
    _, _, name_end = read_tlv(pdu, version_end, end)
    auth_tag, _, _ = read_tlv(pdu, name_end, end)
    return auth_tag == 0xA3


def abandon_target(pdu: bytes) -> int:
    """The message ID that an AbandonRequest PDU abandons."""
    tag, start, end = _protocol_op(pdu)
    if tag != ABANDON_REQUEST:
        raise BerError("not an AbandonRequest")
    return read_integer(pdu, start, end)
