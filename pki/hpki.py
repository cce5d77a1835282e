"""HPKI certificate profile: the hcRole qualification and signer checks (R-SIG-2).

Japanese HPKI (保健医療福祉分野PKI) certificates state the holder's national
qualification in the subjectDirectoryAttributes extension (RFC 5280 §4.2.1.8,
OID 2.5.29.9) as the ISO 17090-3 attribute ``hcRole``
(id-hcpki-at-healthcareactor, 1.0.17090.0.1)::

    SubjectDirectoryAttributes ::= SEQUENCE SIZE (1..MAX) OF Attribute
    Attribute    ::= SEQUENCE { type OBJECT IDENTIFIER, values SET OF HCActorData }
    HCActorData  ::= SET OF HCActor
    HCActor      ::= SEQUENCE {
        codedData            [0] CodedData OPTIONAL,
        regionalHCActorData  [1] SEQUENCE OF RegionalHCActorData OPTIONAL }
    CodedData    ::= SET {
        codingSchemeReference [0] OBJECT IDENTIFIER,
        codeDataValue         [1] NumericString OPTIONAL,
        codeDataFreeText      [2] DirectoryString OPTIONAL }

The MHLW HPKI certificate policy (JAHIS profile) fixes codingSchemeReference to
id-jhpki-cdata (1.2.392.100495.1.6.1.1), leaves codeDataValue unused, puts the
role in codeDataFreeText as a UTF8String (e.g. ``"Medical Doctor"``) and uses
EXPLICIT tags; issued cards (e.g. MEDIS HPKI CA) encode exactly that, and
:func:`encode_hc_role_extension_value` does the same.

Sources differ on details (CodedData as SET or SEQUENCE, explicit or implicit
context tags, the string type), so :func:`parse_hc_roles` accepts all of those
variants.  Anything it cannot read raises :class:`pki.errors.SigningError` with
the path of the offending element; it never leaks an ``IndexError``.

:func:`check_signing_certificate` performs the certificate-local part of R-SIG-2
(nonRepudiation key usage, validity at signing time, qualification against the
R-SIG-1 policy).  Chain building and revocation belong to the validator built on
pyhanko-certvalidator, not to this module.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeAlias

from asn1crypto import core as asn1_core
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pki.errors import SigningError

__all__ = [
    "HC_ROLE_OID",
    "JP_HPKI_CODING_SCHEME",
    "SUBJECT_DIRECTORY_ATTRIBUTES_OID",
    "CertificateInput",
    "HcRole",
    "HpkiCheck",
    "check_signing_certificate",
    "encode_hc_role_extension_value",
    "encode_hc_roles_extension_value",
    "hc_role",
    "hc_role_extension",
    "parse_hc_roles",
    "parse_subject_directory_attributes",
]

#: subjectDirectoryAttributes, RFC 5280 §4.2.1.8.
SUBJECT_DIRECTORY_ATTRIBUTES_OID = "2.5.29.9"
#: id-hcpki-at-healthcareactor (ISO 17090-3), the ``hcRole`` attribute type.
HC_ROLE_OID = "1.0.17090.0.1"
#: id-jhpki-cdata: the Japanese HPKI coding scheme for qualifications.
JP_HPKI_CODING_SCHEME = "1.2.392.100495.1.6.1.1"

#: A certificate as the callers hold it: cryptography, asn1crypto (pyHanko) or DER/PEM.
CertificateInput: TypeAlias = x509.Certificate | asn1_x509.Certificate | bytes


@dataclass(frozen=True)
class HcRole:
    """One ISO 17090-3 CodedData: a qualification in a coding scheme."""

    coding_scheme: str
    code: str | None
    text: str | None


# --------------------------------------------------------------------------
# Minimal DER reader/writer (ITU-T X.690 §8 BER, §10 DER restrictions)
# --------------------------------------------------------------------------

_UNIVERSAL, _CONTEXT = 0, 2
_SEQUENCE, _SET, _OID = 16, 17, 6
# fmt: off
_UNIVERSAL_NAMES = {
    1: "BOOLEAN", 2: "INTEGER", 3: "BIT STRING", 4: "OCTET STRING", 5: "NULL",
    6: "OBJECT IDENTIFIER", 12: "UTF8String", 16: "SEQUENCE", 17: "SET",
    18: "NumericString", 19: "PrintableString", 20: "TeletexString",
    22: "IA5String", 26: "VisibleString", 28: "UniversalString", 30: "BMPString",
}
#: DirectoryString and the other string types accepted in CodedData (X.520).
_STRING_CODECS = {
    12: "utf-8", 18: "ascii", 19: "ascii", 22: "ascii", 26: "ascii",
    20: "latin-1", 28: "utf-32-be", 30: "utf-16-be",
}
# fmt: on


@dataclass(frozen=True)
class _Tlv:
    cls: int
    constructed: bool
    number: int
    value: bytes

    def describe(self) -> str:
        if self.cls == _UNIVERSAL:
            return _UNIVERSAL_NAMES.get(self.number, f"UNIVERSAL {self.number}")
        kind = ("UNIVERSAL", "APPLICATION", "context", "PRIVATE")[self.cls]
        return f"[{self.number}]" if self.cls == _CONTEXT else f"{kind} {self.number}"


def _fail(where: str, problem: str) -> SigningError:
    return SigningError(f"malformed hcRole extension: {where}: {problem}")


def _next_tlv(data: bytes, pos: int, where: str) -> tuple[_Tlv, int]:
    """The TLV starting at ``pos`` and the offset after it (X.690 §8.1)."""
    end = len(data)
    first = data[pos]
    pos += 1
    number = first & 0x1F
    if number == 0x1F:  # high-tag-number form, X.690 §8.1.2.4
        number = 0
        while True:
            if pos >= end:
                raise _fail(where, "truncated tag")
            octet = data[pos]
            pos += 1
            number = (number << 7) | (octet & 0x7F)
            if number > 0xFFFFFF:
                raise _fail(where, "tag number too large")
            if not octet & 0x80:
                break
    if pos >= end:
        raise _fail(where, "truncated length")
    lead = data[pos]
    pos += 1
    if lead < 0x80:
        length = lead
    elif lead == 0x80:
        raise _fail(where, "indefinite length is not allowed in DER")
    else:
        count = lead & 0x7F
        if count > 4 or pos + count > end:
            raise _fail(where, "invalid or truncated long-form length")
        length = int.from_bytes(data[pos : pos + count], "big")
        pos += count
    if length > end - pos:
        raise _fail(where, f"element claims {length} bytes but only {end - pos} remain")
    return _Tlv(first >> 6, bool(first & 0x20), number, data[pos : pos + length]), pos + length


def _read_tlvs(data: bytes, where: str) -> list[_Tlv]:
    """Split ``data`` into consecutive TLVs that cover it exactly."""
    out: list[_Tlv] = []
    pos = 0
    while pos < len(data):
        tlv, pos = _next_tlv(data, pos, where)
        out.append(tlv)
    return out


def _read_one(data: bytes, where: str) -> _Tlv:
    """Exactly one TLV filling ``data`` (no trailing bytes, X.690 §10)."""
    if not data:
        raise _fail(where, "empty where one element was expected")
    tlv, pos = _next_tlv(data, 0, where)
    if pos != len(data):
        raise _fail(where, f"{len(data) - pos} trailing byte(s) after the element")
    return tlv


def _expect_universal(tlv: _Tlv, numbers: Iterable[int], where: str) -> _Tlv:
    wanted = tuple(numbers)
    constructed = wanted[0] in (_SEQUENCE, _SET)
    if tlv.cls != _UNIVERSAL or tlv.number not in wanted or tlv.constructed != constructed:
        names = " or ".join(_UNIVERSAL_NAMES[n] for n in wanted)
        raise _fail(where, f"expected {names}, found {tlv.describe()}")
    return tlv


def _decode_oid(content: bytes, where: str) -> str:
    """OBJECT IDENTIFIER contents to dotted form (X.690 §8.19)."""
    if not content:
        raise _fail(where, "empty OBJECT IDENTIFIER")
    if content[-1] & 0x80:
        raise _fail(where, "truncated OBJECT IDENTIFIER")
    arcs: list[int] = []
    value, fresh = 0, True
    for octet in content:
        if fresh and octet == 0x80:
            raise _fail(where, "non-minimal OBJECT IDENTIFIER encoding")
        value = (value << 7) | (octet & 0x7F)
        fresh = not octet & 0x80
        if fresh:
            arcs.append(value)
            value = 0
    first = arcs[0]
    head = [0, first] if first < 40 else [1, first - 40] if first < 80 else [2, first - 80]
    return ".".join(str(a) for a in head + arcs[1:])


def _decode_string(tlv: _Tlv, where: str) -> str:
    codec = _STRING_CODECS.get(tlv.number) if tlv.cls == _UNIVERSAL else None
    if codec is None or tlv.constructed:
        raise _fail(where, f"expected a character string, found {tlv.describe()}")
    try:
        return tlv.value.decode(codec)
    except UnicodeDecodeError as exc:
        raise _fail(where, f"invalid {tlv.describe()} content ({exc.reason})") from exc


def _der(tag: int, content: bytes) -> bytes:
    """One DER TLV with a single-octet tag and definite minimal length (X.690 §10.1)."""
    size = len(content)
    if size < 0x80:
        return bytes([tag, size]) + content
    raw = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(raw)]) + raw + content


def _encode_oid(dotted: str) -> bytes:
    try:
        arcs = [int(a) for a in dotted.split(".")]
    except ValueError as exc:
        raise SigningError(f"invalid OBJECT IDENTIFIER {dotted!r}") from exc
    if len(arcs) < 2 or arcs[0] > 2 or (arcs[0] < 2 and arcs[1] >= 40) or min(arcs) < 0:
        raise SigningError(f"invalid OBJECT IDENTIFIER {dotted!r}")
    out = bytearray()
    for arc in [arcs[0] * 40 + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out += bytes(reversed(chunk))
    return _der(0x06, bytes(out))


# --------------------------------------------------------------------------
# Encoding (ISO 17090-3, MHLW HPKI certificate profile)
# --------------------------------------------------------------------------


def _encode_coded_data(role: HcRole) -> bytes:
    if role.code is None and role.text is None:
        raise SigningError("an hcRole needs a code or a free-text role name")
    fields = _der(0xA0, _encode_oid(role.coding_scheme))
    if role.code is not None:
        if not role.code or not all((c.isascii() and c.isdigit()) or c == " " for c in role.code):
            raise SigningError(f"hcRole code {role.code!r} is not a NumericString")
        fields += _der(0xA1, _der(0x12, role.code.encode("ascii")))
    if role.text is not None:
        if not role.text:
            raise SigningError("hcRole free text must not be empty")
        fields += _der(0xA2, _der(0x0C, role.text.encode("utf-8")))
    return _der(0x31, fields)  # CodedData ::= SET, fields already in tag order


def encode_hc_roles_extension_value(roles: Iterable[HcRole]) -> bytes:
    """DER SubjectDirectoryAttributes holding one hcRole attribute with ``roles``.

    Each role becomes one HCActor (``[0] EXPLICIT CodedData``); the HCActorData
    SET OF is sorted as DER requires (X.690 §11.6).
    """
    actors = sorted(_der(0x30, _der(0xA0, _encode_coded_data(r))) for r in roles)
    if not actors:
        raise SigningError("at least one hcRole is required")
    hc_actor_data = _der(0x31, b"".join(actors))
    attribute = _der(0x30, _encode_oid(HC_ROLE_OID) + _der(0x31, hc_actor_data))
    return _der(0x30, attribute)


def encode_hc_role_extension_value(role: str, code: str | None = None) -> bytes:
    """DER subjectDirectoryAttributes value for one Japanese HPKI qualification.

    ``role`` is the codeDataFreeText (e.g. ``"Medical Doctor"``), ``code`` the
    optional codeDataValue (a NumericString; unused by the Japanese profile).
    """
    return encode_hc_roles_extension_value([HcRole(JP_HPKI_CODING_SCHEME, code, role)])


def hc_role_extension(role: str, code: str | None = None) -> x509.UnrecognizedExtension:
    """The subjectDirectoryAttributes extension, to add with ``critical=False``.

    RFC 5280 §4.2.1.8: conforming CAs MUST mark this extension non-critical.
    """
    return x509.UnrecognizedExtension(
        x509.ObjectIdentifier(SUBJECT_DIRECTORY_ATTRIBUTES_OID),
        encode_hc_role_extension_value(role, code),
    )


# --------------------------------------------------------------------------
# Parsing (tolerant of SET/SEQUENCE, explicit/implicit tags, string types)
# --------------------------------------------------------------------------


def _parse_coded_data(tagged: _Tlv, where: str) -> HcRole:
    if not tagged.constructed:
        raise _fail(where, "codedData [0] must be constructed")
    children = _read_tlvs(tagged.value, where)
    if (
        len(children) == 1
        and children[0].cls == _UNIVERSAL
        and children[0].number in (_SET, _SEQUENCE)
        and children[0].constructed
    ):
        children = _read_tlvs(children[0].value, where)  # EXPLICIT [0] CodedData
    scheme: str | None = None
    values: dict[int, str] = {}
    for child in children:
        if child.cls != _CONTEXT or child.number not in (0, 1, 2):
            raise _fail(where, f"unexpected element {child.describe()} in CodedData")
        if child.number == 0:
            if scheme is not None:
                raise _fail(where, "codingSchemeReference appears twice")
            sub = f"{where}.codingSchemeReference"
            if child.constructed:
                oid = _expect_universal(_read_one(child.value, sub), [_OID], sub)
                scheme = _decode_oid(oid.value, sub)
            else:
                scheme = _decode_oid(child.value, sub)
            continue
        sub = f"{where}.{'codeDataValue' if child.number == 1 else 'codeDataFreeText'}"
        if child.number in values:
            raise _fail(where, f"{sub.rsplit('.', 1)[1]} appears twice")
        if child.constructed:
            values[child.number] = _decode_string(_read_one(child.value, sub), sub)
        else:  # IMPLICIT tagging loses the string type; NumericString is ASCII, read as UTF-8
            try:
                values[child.number] = child.value.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _fail(sub, "implicitly tagged string is not UTF-8") from exc
    if scheme is None:
        raise _fail(where, "CodedData lacks codingSchemeReference")
    if not values:
        raise _fail(where, "CodedData has neither codeDataValue nor codeDataFreeText")
    return HcRole(scheme, values.get(1), values.get(2))


def _parse_actor(actor: _Tlv, where: str) -> HcRole | None:
    if actor.cls != _UNIVERSAL or actor.number not in (_SEQUENCE, _SET) or not actor.constructed:
        raise _fail(where, f"expected HCActor SEQUENCE, found {actor.describe()}")
    coded: HcRole | None = None
    seen: set[int] = set()
    for child in _read_tlvs(actor.value, where):
        if child.cls != _CONTEXT or child.number not in (0, 1):
            raise _fail(where, f"unexpected element {child.describe()} in HCActor")
        if child.number in seen:
            raise _fail(where, f"element [{child.number}] appears twice in HCActor")
        seen.add(child.number)
        if child.number == 0:
            coded = _parse_coded_data(child, f"{where}.codedData")
        elif not child.constructed:
            raise _fail(where, "regionalHCActorData [1] must be constructed")
    return coded  # an actor with only regional data carries no coded role


def _parse_actor_data(value: _Tlv, where: str) -> list[HcRole]:
    if value.cls != _UNIVERSAL or value.number not in (_SET, _SEQUENCE) or not value.constructed:
        raise _fail(where, f"expected HCActorData SET OF, found {value.describe()}")
    children = _read_tlvs(value.value, where)
    if value.number == _SEQUENCE and children and children[0].cls == _CONTEXT:
        actors = [value]  # a bare HCActor used as the attribute value
    else:
        actors = children
    roles: list[HcRole] = []
    for k, actor in enumerate(actors):
        role = _parse_actor(actor, f"{where}.HCActor[{k}]")
        if role is not None:
            roles.append(role)
    return roles


def parse_subject_directory_attributes(value: bytes) -> list[HcRole]:
    """Every hcRole in a DER subjectDirectoryAttributes value, in encoded order.

    Attributes of other types are skipped.  Malformed input raises
    :class:`SigningError` naming the element at fault.
    """
    top = _read_one(value, "SubjectDirectoryAttributes")
    _expect_universal(top, [_SEQUENCE], "SubjectDirectoryAttributes")
    attributes = _read_tlvs(top.value, "SubjectDirectoryAttributes")
    if not attributes:
        raise _fail("SubjectDirectoryAttributes", "empty (SIZE (1..MAX) required)")
    roles: list[HcRole] = []
    for i, attribute in enumerate(attributes):
        where = f"Attribute[{i}]"
        _expect_universal(attribute, [_SEQUENCE], where)
        parts = _read_tlvs(attribute.value, where)
        if len(parts) != 2:
            raise _fail(where, f"expected type and values, found {len(parts)} elements")
        attr_type = _decode_oid(
            _expect_universal(parts[0], [_OID], f"{where}.type").value, f"{where}.type"
        )
        values = _read_tlvs(_expect_universal(parts[1], [_SET], f"{where}.values").value, where)
        if attr_type != HC_ROLE_OID:
            continue
        if not values:
            raise _fail(where, "hcRole attribute has no value")
        for j, item in enumerate(values):
            roles.extend(_parse_actor_data(item, f"{where}.values[{j}]"))
    return roles


def _as_asn1crypto(cert: CertificateInput) -> asn1_x509.Certificate:
    if isinstance(cert, asn1_x509.Certificate):
        return cert
    if isinstance(cert, x509.Certificate):
        return asn1_x509.Certificate.load(cert.public_bytes(serialization.Encoding.DER))
    if isinstance(cert, bytes | bytearray | memoryview):
        data = bytes(cert)
        if data.lstrip().startswith(b"-----BEGIN"):
            try:
                data = x509.load_pem_x509_certificate(data).public_bytes(serialization.Encoding.DER)
            except ValueError as exc:
                raise SigningError(f"not a PEM certificate: {exc}") from exc
        try:
            loaded = asn1_x509.Certificate.load(data, strict=True)
            loaded["tbs_certificate"]["extensions"]  # asn1crypto parses lazily: force it
            return loaded
        except (ValueError, TypeError, KeyError) as exc:
            raise SigningError(f"not a DER certificate: {exc}") from exc
    raise TypeError(f"unsupported certificate type {type(cert).__name__}")


def _sda_value(cert: asn1_x509.Certificate) -> bytes | None:
    """Raw subjectDirectoryAttributes extnValue, or ``None`` if absent."""
    try:
        extensions = cert["tbs_certificate"]["extensions"]
        if isinstance(extensions, asn1_core.Void):
            return None
        found: list[bytes] = [
            bytes(ext["extn_value"].contents)
            for ext in extensions
            if ext["extn_id"].dotted == SUBJECT_DIRECTORY_ATTRIBUTES_OID
        ]
    except (ValueError, TypeError, KeyError) as exc:
        raise SigningError(f"certificate extensions cannot be parsed: {exc}") from exc
    if len(found) > 1:
        raise SigningError("certificate has more than one subjectDirectoryAttributes extension")
    return found[0] if found else None


def parse_hc_roles(cert: CertificateInput) -> list[HcRole]:
    """Every hcRole (in any coding scheme) the certificate states; ``[]`` if none."""
    value = _sda_value(_as_asn1crypto(cert))
    return [] if value is None else parse_subject_directory_attributes(value)


def hc_role(cert: CertificateInput) -> str | None:
    """The first Japanese HPKI role name (e.g. ``"Medical Doctor"``), or ``None``."""
    for role in parse_hc_roles(cert):
        if role.coding_scheme == JP_HPKI_CODING_SCHEME and role.text:
            return role.text
    return None


# --------------------------------------------------------------------------
# Certificate-local signer checks (R-SIG-1, R-SIG-2)
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class HpkiCheck:
    """Outcome of :func:`check_signing_certificate`.

    ``reasons`` holds one operator-readable sentence per failed check (empty if
    ``ok``); ``role`` is the qualification that satisfied the policy, or the
    first Japanese HPKI role when no role list was given.
    """

    ok: bool
    reasons: list[str] = field(default_factory=list)
    role: str | None = None
    roles: list[HcRole] = field(default_factory=list)


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def check_signing_certificate(
    cert: CertificateInput,
    *,
    allowed_roles: frozenset[str] | None,
    require_role: bool,
    at: datetime,
) -> HpkiCheck:
    """Check a signer certificate against the HPKI profile at time ``at`` (R-SIG-2).

    * keyUsage must include nonRepudiation/contentCommitment (RFC 5280 §4.2.1.3);
    * ``at`` must fall within notBefore..notAfter inclusive (RFC 5280 §4.1.2.5);
    * with ``require_role`` the certificate must state a Japanese HPKI hcRole;
    * with ``allowed_roles`` a stated role must be one of them (R-SIG-1).  Whether
      a role must be present at all is decided by ``require_role`` alone.

    Returns every failed check, not only the first.  Chain and revocation are
    checked elsewhere (pyhanko-certvalidator).
    """
    if at.tzinfo is None:
        raise ValueError("'at' must be timezone-aware")
    acert = _as_asn1crypto(cert)
    reasons: list[str] = []
    try:
        key_usage: Any = acert.key_usage_value
        validity = acert["tbs_certificate"]["validity"]
        not_before: datetime = validity["not_before"].native
        not_after: datetime = validity["not_after"].native
    except (ValueError, TypeError, KeyError) as exc:
        raise SigningError(f"certificate cannot be parsed: {exc}") from exc

    if key_usage is None:
        reasons.append("certificate lacks the nonRepudiation key usage (no keyUsage extension)")
    elif "non_repudiation" not in key_usage.native:
        reasons.append("certificate lacks the nonRepudiation key usage")

    if at < not_before:
        reasons.append(f"certificate is not valid before {_iso(not_before)}")
    if at > not_after:
        reasons.append(f"certificate expired on {_iso(not_after)}")

    roles: list[HcRole] = []
    try:
        roles = parse_hc_roles(acert)
    except SigningError as exc:
        reasons.append(f"certificate's hcRole extension is unreadable: {exc.message}")
    names = [r.text for r in roles if r.coding_scheme == JP_HPKI_CODING_SCHEME and r.text]
    chosen = names[0] if names else None
    if not names:
        if require_role:
            reasons.append("certificate has no hcRole (HPKI qualification)")
    elif allowed_roles is not None:
        permitted = [n for n in names if n in allowed_roles]
        if permitted:
            chosen = permitted[0]
        else:
            allowed = ", ".join(sorted(allowed_roles)) or "none"
            stated = ", ".join(repr(n) for n in names)
            noun = "role" if len(names) == 1 else "roles"
            verb = "is" if len(names) == 1 else "are"
            reasons.append(
                f"{noun} {stated} {verb} not allowed by the signing policy (allowed: {allowed})"
            )
            chosen = None
    return HpkiCheck(ok=not reasons, reasons=reasons, role=chosen, roles=roles)
