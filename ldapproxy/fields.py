"""Decoding the request fields plugins ask for: DNs, search parameters and attribute names,
never credentials or attribute values.

Only requests whose operation some plugin asked for are decoded (see
:attr:`ldapproxy.hooks.Plugin.request_fields`); everything else stays raw bytes.  The
decoder reads a PDU that the framer has already bounded, with the bounds checks of
:func:`ldapproxy.ber.read_tlv`, and raises :class:`ldapproxy.ber.BerError` on anything
malformed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ldapproxy.ber import (
    BOOLEAN,
    ENUMERATED,
    INTEGER,
    MAX_MESSAGE_ID,
    OCTET_STRING,
    SEQUENCE,
    BerError,
    read_integer,
    read_tlv,
)
from ldapproxy.messages import (
    ABANDON_REQUEST,
    ADD_REQUEST,
    BIND_REQUEST,
    COMPARE_REQUEST,
    DEL_REQUEST,
    EXTENDED_REQUEST,
    MODDN_REQUEST,
    MODIFY_REQUEST,
    SEARCH_REQUEST,
    UNBIND_REQUEST,
)

#: Attributes whose values are secrets.  Their values never appear in a decoded field:
#: a search filter on one shows ``***`` in place of the value.  Compared lower-case.
PASSWORD_ATTRIBUTES: frozenset[str] = frozenset(
    {
        "userpassword",
        "unicodepwd",
        "authpassword",
        "clearpassword",
        "ntpwdhistory",
        "lmpwdhistory",
        "dbcspwd",
        "supplementalcredentials",
        "sambantpassword",
        "sambalmpassword",
        "krbprincipalkey",
        "msds-managedpassword",
        "ms-mcs-admpwd",
        "mslaps-password",
        "mslaps-encryptedpassword",
        "2.5.4.35",  # userPassword by OID
        "1.2.840.113556.1.4.90",  # unicodePwd by OID
        "1.3.6.1.4.1.4203.1.3.4",  # authPassword by OID
    }
)


@dataclass(frozen=True, slots=True)
class RequestFields:
    """What a request says, minus its secrets.  Fields that an operation does not have are
    empty (``""``, ``()``) or ``None``.

    ========  ==============================================================================
    op        fields set
    ========  ==============================================================================
    bind      ``dn`` (the bind name), ``mechanism`` (``"simple"`` or the SASL mechanism)
    search    ``dn`` (the base), ``scope``, ``filter``, ``attributes`` (requested)
    compare   ``dn``, ``attributes`` (the one compared; never its value)
    add       ``dn``, ``attributes`` (the names in the entry; never values)
    modify    ``dn``, ``attributes`` (the names modified; never values)
    delete    ``dn``
    modrdn    ``dn``, ``new_rdn``, ``new_superior``
    extended  ``oid`` (the requestName; the value is never decoded)
    abandon   ``abandoned`` (the message ID abandoned)
    unbind    nothing
    ========  ==============================================================================

    Every request also carries ``controls``: the OIDs of its request controls, in order.
    """

    dn: str = ""
    #: ``"base"``, ``"one"``, ``"sub"`` or ``"children"`` (search only).
    scope: str | None = None
    #: The search filter as an RFC 4515 string; values of :data:`PASSWORD_ATTRIBUTES`
    #: are replaced with ``***``.
    filter: str | None = None
    attributes: tuple[str, ...] = ()
    mechanism: str | None = None
    oid: str | None = None
    new_rdn: str | None = None
    new_superior: str | None = None
    abandoned: int | None = None
    controls: tuple[str, ...] = ()


def decode_fields(op: int, pdu: bytes) -> RequestFields:
    """The :class:`RequestFields` of the request PDU ``pdu`` whose protocolOp tag is ``op``.

    ``pdu`` is one whole LDAPMessage.  Every element read must sit where RFC 4511 puts it,
    with the tag it gives and nothing left over; the parts that are never decoded
    (passwords, SASL credentials, attribute values, extended request values, control
    values) are only skipped, by their length.  An operation the proxy does not know only
    has its ``controls`` decoded.

    Strings are UTF-8 with undecodable bytes replaced (U+FFFD), except filter assertion
    values, which RFC 4515 escapes: ``*``, ``(``, ``)``, ``\\`` and NUL, and every byte that
    is not part of valid UTF-8, become ``\\XX`` (lowercase hex).  Add and modify
    ``attributes`` keep the first spelling of names that differ only in case.  Filters nest
    at most :data:`MAX_FILTER_DEPTH` and / or / not filters deep.

    :raises ldapproxy.ber.BerError: the PDU is malformed, or its protocolOp tag is not
        ``op``.
    """
    end = len(pdu)
    tag, start, message_end = read_tlv(pdu, 0, end)
    if tag != SEQUENCE or message_end != end:
        raise BerError("not one LDAPMessage SEQUENCE")
    id_tag, id_start, id_end = read_tlv(pdu, start, end)
    if id_tag != INTEGER:
        raise BerError("LDAPMessage without a messageID")
    read_integer(pdu, id_start, id_end)
    op_tag, body, body_end = read_tlv(pdu, id_end, end)
    if op_tag != op:
        raise BerError(f"protocolOp tag 0x{op_tag:02x} is not 0x{op:02x}")
    controls = _controls(pdu, body_end, end)
    decoder = _DECODERS.get(op)
    if decoder is None:
        return RequestFields(controls=controls)
    return decoder(pdu, body, body_end, controls)


# -- primitives ------------------------------------------------------------------------------


def _expect(buf: bytes, pos: int, end: int, tag: int, what: str) -> tuple[int, int]:
    """Read the element at ``pos``, which must have tag ``tag``: ``(value_start, value_end)``."""
    found, start, stop = read_tlv(buf, pos, end)
    if found != tag:
        raise BerError(f"expected {what} (tag 0x{tag:02x}), got tag 0x{found:02x}")
    return start, stop


def _text(buf: bytes, start: int, end: int) -> str:
    """A DN, attribute description, OID or mechanism: UTF-8, undecodable bytes replaced."""
    return buf[start:end].decode("utf-8", "replace")


def _done(pos: int, end: int, what: str) -> None:
    """Nothing may follow the last element of ``what``."""
    if pos != end:
        raise BerError(f"unexpected data after {what}")


_ATTRIBUTE_CHARACTERS = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-;."
)


def _filter_attribute(buf: bytes, start: int, end: int) -> str:
    """An attribute description in a filter.  Characters RFC 4512 does not allow there
    are written ``\\XX``, so that a hostile name such as ``x=1)(uid=a`` cannot make the
    filter string read like a different filter in a log."""
    text = _text(buf, start, end)
    if all(c in _ATTRIBUTE_CHARACTERS for c in text):
        return text
    return "".join(
        c if c in _ATTRIBUTE_CHARACTERS else "".join(f"\\{b:02x}" for b in c.encode()) for c in text
    )


def _is_secret(attribute: str) -> bool:
    """Whether ``attribute`` (options such as ``;binary`` ignored) holds secrets."""
    return attribute.partition(";")[0].lower() in PASSWORD_ATTRIBUTES


def _unique(names: list[str]) -> tuple[str, ...]:
    """``names`` in order, without repeats (attribute names compare case-insensitively)."""
    seen: set[str] = set()
    unique = []
    for name in names:
        key = name.lower()
        if key not in seen:
            seen.add(key)
            unique.append(name)
    return tuple(unique)


def _controls(buf: bytes, pos: int, end: int) -> tuple[str, ...]:
    """The controlType of every control in the optional ``[0] Controls`` at ``pos``."""
    if pos == end:
        return ()
    start, controls_end = _expect(buf, pos, end, 0xA0, "[0] Controls")
    _done(controls_end, end, "the controls")
    oids = []
    pos = start
    while pos < controls_end:
        control, control_end = _expect(buf, pos, controls_end, SEQUENCE, "Control")
        oid_start, element = _expect(buf, control, control_end, OCTET_STRING, "controlType")
        oids.append(_text(buf, oid_start, element))
        if element < control_end:
            tag, value_start, value_end = read_tlv(buf, element, control_end)
            if tag == BOOLEAN:
                if value_end - value_start != 1:
                    raise BerError("malformed criticality")
                element = value_end
        if element < control_end:
            element = _expect(buf, element, control_end, OCTET_STRING, "controlValue")[1]
        _done(element, control_end, "a Control")
        pos = control_end
    return tuple(oids)


# -- operations ------------------------------------------------------------------------------


def _bind(buf: bytes, pos: int, end: int, controls: tuple[str, ...]) -> RequestFields:
    version_start, version_end = _expect(buf, pos, end, INTEGER, "version")
    read_integer(buf, version_start, version_end)
    name_start, name_end = _expect(buf, version_end, end, OCTET_STRING, "name")
    auth, auth_start, auth_end = read_tlv(buf, name_end, end)
    _done(auth_end, end, "the BindRequest")
    mechanism: str | None = None
    if auth == 0x80:  # simple [0]: the password is not read
        mechanism = "simple"
    elif auth == 0xA3:  # sasl [3]: mechanism, then credentials (not read)
        start, stop = _expect(buf, auth_start, auth_end, OCTET_STRING, "SASL mechanism")
        mechanism = _text(buf, start, stop)
        if stop < auth_end:
            stop = _expect(buf, stop, auth_end, OCTET_STRING, "SASL credentials")[1]
        _done(stop, auth_end, "the SASL credentials")
    # Any other choice (Microsoft's Sicily [9] - [11]...) leaves the mechanism unknown.
    return RequestFields(
        dn=_text(buf, name_start, name_end), mechanism=mechanism, controls=controls
    )


_SCOPES = {0: "base", 1: "one", 2: "sub", 3: "children"}


def _search(buf: bytes, pos: int, end: int, controls: tuple[str, ...]) -> RequestFields:
    base_start, base_end = _expect(buf, pos, end, OCTET_STRING, "baseObject")
    start, stop = _expect(buf, base_end, end, ENUMERATED, "scope")
    scope = _SCOPES.get(read_integer(buf, start, stop))
    if scope is None:
        raise BerError("unknown search scope")
    start, stop = _expect(buf, stop, end, ENUMERATED, "derefAliases")
    read_integer(buf, start, stop)
    start, stop = _expect(buf, stop, end, INTEGER, "sizeLimit")
    read_integer(buf, start, stop)
    start, stop = _expect(buf, stop, end, INTEGER, "timeLimit")
    read_integer(buf, start, stop)
    start, stop = _expect(buf, stop, end, BOOLEAN, "typesOnly")
    if stop - start != 1:
        raise BerError("malformed typesOnly")
    tag, start, stop = read_tlv(buf, stop, end)
    search_filter = _filter(buf, tag, start, stop, 0)
    pos, attributes_end = _expect(buf, stop, end, SEQUENCE, "attributes")
    _done(attributes_end, end, "the SearchRequest")
    attributes = []
    while pos < attributes_end:
        start, pos = _expect(buf, pos, attributes_end, OCTET_STRING, "an attribute selector")
        attributes.append(_text(buf, start, pos))
    return RequestFields(
        dn=_text(buf, base_start, base_end),
        scope=scope,
        filter=search_filter,
        attributes=tuple(attributes),
        controls=controls,
    )


def _modify(buf: bytes, pos: int, end: int, controls: tuple[str, ...]) -> RequestFields:
    dn_start, dn_end = _expect(buf, pos, end, OCTET_STRING, "object")
    pos, changes_end = _expect(buf, dn_end, end, SEQUENCE, "changes")
    _done(changes_end, end, "the ModifyRequest")
    names = []
    while pos < changes_end:
        change, change_end = _expect(buf, pos, changes_end, SEQUENCE, "a change")
        start, stop = _expect(buf, change, change_end, ENUMERATED, "operation")
        read_integer(buf, start, stop)
        name, modification_end = _attribute(buf, stop, change_end)
        _done(modification_end, change_end, "a change")
        names.append(name)
        pos = change_end
    return RequestFields(
        dn=_text(buf, dn_start, dn_end), attributes=_unique(names), controls=controls
    )


def _add(buf: bytes, pos: int, end: int, controls: tuple[str, ...]) -> RequestFields:
    dn_start, dn_end = _expect(buf, pos, end, OCTET_STRING, "entry")
    pos, attributes_end = _expect(buf, dn_end, end, SEQUENCE, "attributes")
    _done(attributes_end, end, "the AddRequest")
    names = []
    while pos < attributes_end:
        name, pos = _attribute(buf, pos, attributes_end)
        names.append(name)
    return RequestFields(
        dn=_text(buf, dn_start, dn_end), attributes=_unique(names), controls=controls
    )


def _attribute(buf: bytes, pos: int, end: int) -> tuple[str, int]:
    """The type of the ``SEQUENCE { type, vals SET OF value }`` at ``pos``, and where the
    SEQUENCE ends.  The values are skipped, never decoded."""
    start, stop = _expect(buf, pos, end, SEQUENCE, "an attribute")
    type_start, type_end = _expect(buf, start, stop, OCTET_STRING, "an attribute type")
    _, vals_end = _expect(buf, type_end, stop, 0x31, "an attribute's values")
    _done(vals_end, stop, "an attribute's values")
    return _text(buf, type_start, type_end), stop


def _delete(buf: bytes, pos: int, end: int, controls: tuple[str, ...]) -> RequestFields:
    return RequestFields(dn=_text(buf, pos, end), controls=controls)


def _moddn(buf: bytes, pos: int, end: int, controls: tuple[str, ...]) -> RequestFields:
    dn_start, dn_end = _expect(buf, pos, end, OCTET_STRING, "entry")
    rdn_start, rdn_end = _expect(buf, dn_end, end, OCTET_STRING, "newrdn")
    start, stop = _expect(buf, rdn_end, end, BOOLEAN, "deleteoldrdn")
    if stop - start != 1:
        raise BerError("malformed deleteoldrdn")
    new_superior = None
    if stop < end:
        start, stop = _expect(buf, stop, end, 0x80, "newSuperior")
        new_superior = _text(buf, start, stop)
    _done(stop, end, "the ModifyDNRequest")
    return RequestFields(
        dn=_text(buf, dn_start, dn_end),
        new_rdn=_text(buf, rdn_start, rdn_end),
        new_superior=new_superior,
        controls=controls,
    )


def _compare(buf: bytes, pos: int, end: int, controls: tuple[str, ...]) -> RequestFields:
    dn_start, dn_end = _expect(buf, pos, end, OCTET_STRING, "entry")
    start, stop = _expect(buf, dn_end, end, SEQUENCE, "ava")
    _done(stop, end, "the CompareRequest")
    attribute, _, _ = _assertion(buf, start, stop)
    return RequestFields(
        dn=_text(buf, dn_start, dn_end), attributes=(attribute,), controls=controls
    )


def _abandon(buf: bytes, pos: int, end: int, controls: tuple[str, ...]) -> RequestFields:
    abandoned = read_integer(buf, pos, end)
    if not 0 <= abandoned <= MAX_MESSAGE_ID:
        raise BerError("abandoned messageID out of range")
    return RequestFields(abandoned=abandoned, controls=controls)


def _extended(buf: bytes, pos: int, end: int, controls: tuple[str, ...]) -> RequestFields:
    start, stop = _expect(buf, pos, end, 0x80, "requestName")
    oid = _text(buf, start, stop)
    if stop < end:  # requestValue: skipped, never decoded
        stop = _expect(buf, stop, end, 0x81, "requestValue")[1]
    _done(stop, end, "the ExtendedRequest")
    return RequestFields(oid=oid, controls=controls)


def _unbind(buf: bytes, pos: int, end: int, controls: tuple[str, ...]) -> RequestFields:
    _done(pos, end, "the UnbindRequest")
    return RequestFields(controls=controls)


_DECODERS: dict[int, Callable[[bytes, int, int, tuple[str, ...]], RequestFields]] = {
    BIND_REQUEST: _bind,
    SEARCH_REQUEST: _search,
    MODIFY_REQUEST: _modify,
    ADD_REQUEST: _add,
    DEL_REQUEST: _delete,
    MODDN_REQUEST: _moddn,
    COMPARE_REQUEST: _compare,
    ABANDON_REQUEST: _abandon,
    EXTENDED_REQUEST: _extended,
    UNBIND_REQUEST: _unbind,
}


# -- search filters (RFC 4515 string form) ---------------------------------------------------

#: How deeply and / or / not filters may nest.  Real clients stay far below; deeper ones
#: are an attack on the decoder's stack.
MAX_FILTER_DEPTH = 64

#: ``\XX`` for the characters RFC 4515 requires escaped and, through the
#: ``surrogateescape`` decoding in :func:`_escape`, for every byte that is not valid UTF-8.
_ESCAPES: dict[int, str] = {ord(c): f"\\{ord(c):02x}" for c in "\0()*\\"}
_ESCAPES.update({0xDC00 + byte: f"\\{byte:02x}" for byte in range(0x80, 0x100)})

#: The attribute-value-assertion filter choices and their RFC 4515 operators.
_AVA_OPERATORS = {0xA3: "=", 0xA5: ">=", 0xA6: "<=", 0xA8: "~="}

_REDACTED = "***"


def _escape(value: bytes) -> str:
    """An assertion value in RFC 4515 form: valid UTF-8 kept, special characters and any
    byte outside valid UTF-8 written ``\\XX`` (lowercase hex)."""
    return value.decode("utf-8", "surrogateescape").translate(_ESCAPES)


def _assertion(buf: bytes, pos: int, end: int) -> tuple[str, int, int]:
    """An AttributeValueAssertion's attribute and the bounds of its (undecoded) value."""
    name_start, name_end = _expect(buf, pos, end, OCTET_STRING, "attributeDesc")
    value_start, value_end = _expect(buf, name_end, end, OCTET_STRING, "assertionValue")
    _done(value_end, end, "an AttributeValueAssertion")
    return _filter_attribute(buf, name_start, name_end), value_start, value_end


def _filter(buf: bytes, tag: int, start: int, end: int, depth: int) -> str:
    """The RFC 4515 string of the Filter element with ``tag`` and content ``buf[start:end]``,
    ``depth`` and / or / not filters deep."""
    operator = _AVA_OPERATORS.get(tag)
    if operator is not None:
        attribute, value_start, value_end = _assertion(buf, start, end)
        value = _REDACTED if _is_secret(attribute) else _escape(buf[value_start:value_end])
        return f"({attribute}{operator}{value})"
    if tag == 0x87:  # present
        return f"({_filter_attribute(buf, start, end)}=*)"
    if tag in (0xA0, 0xA1, 0xA2):
        if depth >= MAX_FILTER_DEPTH:
            raise BerError(f"filter nested more than {MAX_FILTER_DEPTH} deep")
        parts = []
        pos = start
        while pos < end:
            inner_tag, inner_start, pos = read_tlv(buf, pos, end)
            parts.append(_filter(buf, inner_tag, inner_start, pos, depth + 1))
        if tag == 0xA2:
            if len(parts) != 1:
                raise BerError("a not filter holds exactly one filter")
            return f"(!{parts[0]})"
        return ("(&" if tag == 0xA0 else "(|") + "".join(parts) + ")"
    if tag == 0xA4:
        return _substrings(buf, start, end)
    if tag == 0xA9:
        return _extensible(buf, start, end)
    raise BerError(f"unknown filter choice 0x{tag:02x}")


def _substrings(buf: bytes, pos: int, end: int) -> str:
    """``(type=initial*any*...*final)``, or ``(type=***)`` for a secret attribute."""
    name_start, name_end = _expect(buf, pos, end, OCTET_STRING, "substrings type")
    pos, items_end = _expect(buf, name_end, end, SEQUENCE, "substrings")
    _done(items_end, end, "a SubstringFilter")
    if pos == items_end:
        raise BerError("a SubstringFilter without substrings")
    attribute = _filter_attribute(buf, name_start, name_end)
    secret = _is_secret(attribute)
    initial = final = ""
    middle = []
    final_seen = False
    items_start = pos
    while pos < items_end:
        if final_seen:
            raise BerError("a final substring must come last")
        tag, start, stop = read_tlv(buf, pos, items_end)
        # A secret's substrings are checked for shape but never decoded.
        value = "" if secret else _escape(buf[start:stop])
        if tag == 0x80:
            if pos != items_start:
                raise BerError("an initial substring must come first")
            initial = value
        elif tag == 0x81:
            middle.append(value)
        elif tag == 0x82:
            final = value
            final_seen = True
        else:
            raise BerError(f"unexpected substring tag 0x{tag:02x}")
        pos = stop
    if secret:
        return f"({attribute}={_REDACTED})"
    return f"({attribute}={initial}*{''.join(m + '*' for m in middle)}{final})"


def _extensible(buf: bytes, pos: int, end: int) -> str:
    """``(type:dn:rule:=value)``, parts absent from the MatchingRuleAssertion left out."""
    rule = attribute = ""
    dn_attributes = False
    tag, start, stop = read_tlv(buf, pos, end)
    if tag == 0x81:  # matchingRule [1]
        rule = _filter_attribute(buf, start, stop)
        tag, start, stop = read_tlv(buf, stop, end)
    if tag == 0x82:  # type [2]
        attribute = _filter_attribute(buf, start, stop)
        tag, start, stop = read_tlv(buf, stop, end)
    if tag != 0x83:
        raise BerError("a MatchingRuleAssertion without matchValue")
    # Without a type the rule is applied to every attribute, password attributes included.
    secret = not attribute or _is_secret(attribute)
    value = _REDACTED if secret else _escape(buf[start:stop])
    if stop < end:  # dnAttributes [4] BOOLEAN DEFAULT FALSE
        start, stop = _expect(buf, stop, end, 0x84, "dnAttributes")
        if stop - start != 1:
            raise BerError("malformed dnAttributes")
        dn_attributes = buf[start] != 0
    _done(stop, end, "a MatchingRuleAssertion")
    return f"({attribute}{':dn' if dn_attributes else ''}{':' + rule if rule else ''}:={value})"
