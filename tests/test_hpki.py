"""HPKI profile: hcRole encoding/parsing and signer certificate checks (R-SIG-2)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pki import devpki
from pki.devpki import DevPki
from pki.errors import SigningError
from pki.hpki import (
    HC_ROLE_OID,
    JP_HPKI_CODING_SCHEME,
    SUBJECT_DIRECTORY_ATTRIBUTES_OID,
    HcRole,
    check_signing_certificate,
    encode_hc_role_extension_value,
    encode_hc_roles_extension_value,
    hc_role,
    hc_role_extension,
    parse_hc_roles,
    parse_subject_directory_attributes,
)

NOW = datetime(2026, 4, 1, 9, 0, 0, tzinfo=UTC)
DOCTOR = HcRole(JP_HPKI_CODING_SCHEME, None, "Medical Doctor")
#: subjectDirectoryAttributes value of a MEDIS HPKI CA (Japan) signing certificate for
#: a "Medical Doctor": SET-shaped CodedData, EXPLICIT tags, UTF8String free text.
ISSUED_CARD_VALUE = bytes.fromhex(
    "303430320606288185420001312831263024a0223120a00c060a2a830886910f01060101"
    "a2100c0e4d65646963616c20446f63746f72"
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return devpki.generate(tmp_path_factory.mktemp("hpki") / "pki", now=NOW)


# ---------------------------------------------------------- DER test builders


def tlv(tag: int, *parts: bytes) -> bytes:
    """A DER element for hand-built variants (short lengths are enough here)."""
    body = b"".join(parts)
    assert len(body) < 0x80
    return bytes([tag, len(body)]) + body


JP_OID = bytes.fromhex("2a830886910f01060101")  # 1.2.392.100495.1.6.1.1 contents
HC_ROLE_OID_TLV = tlv(0x06, bytes.fromhex("288185420001"))


def sda(*attribute_values: bytes, attr_oid: bytes = HC_ROLE_OID_TLV) -> bytes:
    return tlv(0x30, tlv(0x30, attr_oid, tlv(0x31, *attribute_values)))


def cert_with_extension(
    value: bytes | None, *, not_after: datetime | None = None
) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "hcRole test")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(not_after or NOW + timedelta(days=1))
    )
    if value is not None:
        ext = x509.UnrecognizedExtension(
            x509.ObjectIdentifier(SUBJECT_DIRECTORY_ATTRIBUTES_OID), value
        )
        builder = builder.add_extension(ext, critical=False)
    return builder.sign(key, hashes.SHA256())


# ------------------------------------------------------------------ encoding


def test_encoder_matches_an_issued_hpki_card_byte_for_byte() -> None:
    assert encode_hc_role_extension_value("Medical Doctor") == ISSUED_CARD_VALUE
    assert parse_subject_directory_attributes(ISSUED_CARD_VALUE) == [DOCTOR]


@pytest.mark.parametrize(
    ("role", "code"),
    [
        ("Medical Doctor", None),
        ("Radiological Technologist", None),
        ("Pharmacist", "0123"),
        ("医師", None),  # non-ASCII DirectoryString content round-trips as UTF-8
        ("x" * 300, None),  # long-form lengths
    ],
)
def test_round_trip(role: str, code: str | None) -> None:
    value = encode_hc_role_extension_value(role, code)
    assert parse_subject_directory_attributes(value) == [HcRole(JP_HPKI_CODING_SCHEME, code, role)]


def test_several_actors_round_trip_in_der_order() -> None:
    roles = [DOCTOR, HcRole(JP_HPKI_CODING_SCHEME, None, "Director of Hospital")]
    parsed = parse_subject_directory_attributes(encode_hc_roles_extension_value(roles))
    assert sorted(parsed, key=lambda r: r.text or "") == sorted(roles, key=lambda r: r.text or "")
    assert len(parsed) == 2


@pytest.mark.parametrize(
    ("role", "code", "message"),
    [("", None, "must not be empty"), ("Medical Doctor", "12a", "NumericString")],
)
def test_encoder_refuses_values_the_profile_cannot_carry(
    role: str, code: str | None, message: str
) -> None:
    with pytest.raises(SigningError, match=message):
        encode_hc_role_extension_value(role, code)


def test_extension_object_is_ready_to_add_and_parses_from_every_input_type() -> None:
    ext = hc_role_extension("Medical Doctor")
    assert ext.oid.dotted_string == "2.5.29.9"
    assert ext.value == ISSUED_CARD_VALUE
    cert = cert_with_extension(ext.value)
    assert not cert.extensions.get_extension_for_oid(ext.oid).critical
    der = cert.public_bytes(serialization.Encoding.DER)
    pem = cert.public_bytes(serialization.Encoding.PEM)
    for form in (cert, asn1_x509.Certificate.load(der), der, pem):
        assert parse_hc_roles(form) == [DOCTOR], type(form)
        assert hc_role(form) == "Medical Doctor"


# ---------------------------------------------------------- tolerant parsing


@pytest.mark.parametrize(
    "coded_data_field",
    [
        # CodedData as a SEQUENCE (ISO 17090 drafts) instead of a SET
        tlv(0xA0, tlv(0x30, tlv(0xA0, tlv(0x06, JP_OID)), tlv(0xA2, tlv(0x0C, b"Nurse")))),
        # IMPLICIT tags throughout: [0] holds CodedData's fields directly
        tlv(0xA0, tlv(0x80, JP_OID), tlv(0x82, b"Nurse")),
        # PrintableString and BMPString free text
        tlv(0xA0, tlv(0x31, tlv(0xA0, tlv(0x06, JP_OID)), tlv(0xA2, tlv(0x13, b"Nurse")))),
        tlv(
            0xA0,
            tlv(
                0x31,
                tlv(0xA0, tlv(0x06, JP_OID)),
                tlv(0xA2, tlv(0x1E, "Nurse".encode("utf-16-be"))),
            ),
        ),
    ],
)
def test_parser_accepts_encoding_variants(coded_data_field: bytes) -> None:
    value = sda(tlv(0x31, tlv(0x30, coded_data_field)))
    assert parse_subject_directory_attributes(value) == [
        HcRole(JP_HPKI_CODING_SCHEME, None, "Nurse")
    ]


def test_parser_accepts_bare_actor_and_skips_other_attributes() -> None:
    coded = tlv(0xA0, tlv(0x31, tlv(0xA0, tlv(0x06, JP_OID)), tlv(0xA1, tlv(0x12, b"42"))))
    date_of_birth = tlv(
        0x30,
        tlv(0x06, bytes.fromhex("2b06010505070901")),  # 1.3.6.1.5.5.7.9.1
        tlv(0x31, tlv(0x18, b"19700101000000Z")),
    )
    hc = tlv(0x30, HC_ROLE_OID_TLV, tlv(0x31, tlv(0x30, coded)))  # HCActor without the SET OF
    value = tlv(0x30, date_of_birth, hc)
    assert parse_subject_directory_attributes(value) == [HcRole(JP_HPKI_CODING_SCHEME, "42", None)]
    assert parse_subject_directory_attributes(tlv(0x30, date_of_birth)) == []


def test_roles_in_other_coding_schemes_are_reported_but_not_japanese() -> None:
    other = tlv(0x06, bytes.fromhex("2a0304"))  # 1.2.3.4
    coded = tlv(0xA0, tlv(0x31, tlv(0xA0, other), tlv(0xA2, tlv(0x0C, b"Physician"))))
    cert = cert_with_extension(sda(tlv(0x31, tlv(0x30, coded))))
    assert parse_hc_roles(cert) == [HcRole("1.2.3.4", None, "Physician")]
    assert hc_role(cert) is None


# ---------------------------------------------------------- malformed input


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (b"", "empty where one element was expected"),
        (b"\x31\x00", "expected SEQUENCE, found SET"),
        (b"\x30\x00", "SIZE (1..MAX)"),
        (b"\x30\x80\x00\x00", "indefinite length"),
        (ISSUED_CARD_VALUE + b"\x00", "1 trailing byte(s) after the element"),
        (b"\x30\x05\x30\x00", "element claims 5 bytes but only 2 remain"),
        (sda(), "hcRole attribute has no value"),
        (sda(tlv(0x31, tlv(0x30, tlv(0xA0, tlv(0x31, tlv(0xA2, tlv(0x0C, b"x"))))))),
         "lacks codingSchemeReference"),
        (sda(tlv(0x31, tlv(0x30, tlv(0xA0, tlv(0x31, tlv(0xA0, tlv(0x06, JP_OID))))))),
         "neither codeDataValue nor codeDataFreeText"),
        (sda(tlv(0x31, tlv(0x30, tlv(0xA0, tlv(0x80, JP_OID), tlv(0x80, JP_OID),
                                      tlv(0x82, b"x"))))),
         "codingSchemeReference appears twice"),
        (sda(tlv(0x31, tlv(0x30, tlv(0xA0, tlv(0x80, b"\x2a\x83"), tlv(0x82, b"x"))))),
         "truncated OBJECT IDENTIFIER"),
        (sda(tlv(0x31, tlv(0x30, tlv(0xA0, tlv(0x80, JP_OID), tlv(0xA2, tlv(0x0C, b"\xff")))))),
         "invalid UTF8String"),
        (sda(tlv(0x31, tlv(0x30, tlv(0xA0, tlv(0x80, JP_OID), tlv(0xA2, tlv(0x04, b"x")))))),
         "expected a character string, found OCTET STRING"),
        (sda(tlv(0x31, tlv(0x30, tlv(0xA5, b"")))), "unexpected element [5] in HCActor"),
        (sda(tlv(0x31, tlv(0x02, b"\x01"))), "expected HCActor SEQUENCE, found INTEGER"),
    ],
)  # fmt: skip
def test_malformed_values_raise_signing_error_with_a_precise_message(
    value: bytes, message: str
) -> None:
    with pytest.raises(SigningError, match="malformed hcRole extension") as info:
        parse_subject_directory_attributes(value)
    assert message in info.value.message


def test_every_truncation_of_a_valid_value_is_refused() -> None:
    """Corrupt the project's own encoder output (STYLE §11)."""
    for cut in range(len(ISSUED_CARD_VALUE)):
        with pytest.raises(SigningError):
            parse_subject_directory_attributes(ISSUED_CARD_VALUE[:cut])


def test_certificate_with_malformed_extension() -> None:
    cert = cert_with_extension(b"\x30\x03\x02\x01\x00")
    with pytest.raises(SigningError, match="expected SEQUENCE, found INTEGER"):
        parse_hc_roles(cert)
    check = check_signing_certificate(cert, allowed_roles=None, require_role=True, at=NOW)
    assert not check.ok
    assert any(r.startswith("certificate's hcRole extension is unreadable") for r in check.reasons)
    assert "certificate has no hcRole (HPKI qualification)" in check.reasons


def test_non_certificate_bytes_raise_signing_error() -> None:
    with pytest.raises(SigningError, match="not a DER certificate"):
        parse_hc_roles(b"\x30\x03\x02\x01\x00")
    with pytest.raises(SigningError, match="not a PEM certificate"):
        parse_hc_roles(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_random_bytes_only_raise_signing_error(data: bytes) -> None:
    for parse in (parse_hc_roles, parse_subject_directory_attributes):
        try:
            result = parse(data)
        except SigningError:
            continue
        assert isinstance(result, list)
        assert all(isinstance(r, HcRole) for r in result)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_mutated_certificates_only_raise_signing_error(data: st.DataObject) -> None:
    """Flip bytes inside a real certificate's hcRole extension and around it."""
    der = bytearray(CARD_CERT_DER)
    start = der.find(ISSUED_CARD_VALUE)
    assert start > 0
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(start - 8, start + len(ISSUED_CARD_VALUE) - 1))
        der[pos] = data.draw(st.integers(0, 255))
    try:
        roles = parse_hc_roles(bytes(der))
    except SigningError:
        return
    assert all(isinstance(r, HcRole) for r in roles)


CARD_CERT_DER = cert_with_extension(ISSUED_CARD_VALUE).public_bytes(serialization.Encoding.DER)


# --------------------------------------------------------------- dev PKI certs


def test_dev_pki_roles(pki: DevPki) -> None:
    assert parse_hc_roles(pki.cert("hpki-signer")) == [DOCTOR]
    assert hc_role(pki.cert("hpki-signer")) == "Medical Doctor"
    assert hc_role(pki.cert("hpki-signer-technologist")) == "Radiological Technologist"
    assert parse_hc_roles(pki.cert("hpki-signer-no-role")) == []
    assert hc_role(pki.cert("hpki-signer-no-role")) is None
    assert hc_role(pki.cert_path("partner-valid-1").read_bytes()) is None  # PEM bytes
    assert HC_ROLE_OID == "1.0.17090.0.1"


# ------------------------------------------------------ check_signing_certificate

DOCTORS_ONLY = frozenset({"Medical Doctor"})


def test_qualified_signer_passes(pki: DevPki) -> None:
    check = check_signing_certificate(
        pki.cert("hpki-signer"), allowed_roles=DOCTORS_ONLY, require_role=True, at=NOW
    )
    assert check.ok and check.reasons == []
    assert check.role == "Medical Doctor" and check.roles == [DOCTOR]


def test_missing_role(pki: DevPki) -> None:
    cert = pki.cert("hpki-signer-no-role")
    check = check_signing_certificate(cert, allowed_roles=None, require_role=True, at=NOW)
    assert not check.ok
    assert check.reasons == ["certificate has no hcRole (HPKI qualification)"]
    relaxed = check_signing_certificate(cert, allowed_roles=None, require_role=False, at=NOW)
    assert relaxed.ok and relaxed.role is None


def test_disallowed_role(pki: DevPki) -> None:
    check = check_signing_certificate(
        pki.cert("hpki-signer-technologist"),
        allowed_roles=frozenset({"Medical Doctor", "Dentist"}),
        require_role=True,
        at=NOW,
    )
    assert not check.ok and check.role is None
    assert check.reasons == [
        "role 'Radiological Technologist' is not allowed by the signing policy "
        "(allowed: Dentist, Medical Doctor)"
    ]


def test_expired_and_not_yet_valid(pki: DevPki) -> None:
    expired = check_signing_certificate(
        pki.cert("hpki-signer-expired"), allowed_roles=DOCTORS_ONLY, require_role=True, at=NOW
    )
    assert expired.reasons == ["certificate expired on 2026-03-31T09:00:00Z"]
    # Before notBefore (NOW - 1 day): a signature dated earlier is refused too.
    early = check_signing_certificate(
        pki.cert("hpki-signer"),
        allowed_roles=None,
        require_role=False,
        at=NOW - timedelta(days=2),
    )
    assert early.reasons == ["certificate is not valid before 2026-03-31T09:00:00Z"]
    # The expired certificate was fine while it was valid (R-SIG-2: "at signing time").
    then = check_signing_certificate(
        pki.cert("hpki-signer-expired"),
        allowed_roles=DOCTORS_ONLY,
        require_role=True,
        at=NOW - timedelta(days=30),
    )
    assert then.ok


def test_missing_non_repudiation(pki: DevPki) -> None:
    check = check_signing_certificate(
        pki.cert("hpki-signer-no-nonrep"), allowed_roles=DOCTORS_ONLY, require_role=True, at=NOW
    )
    assert check.reasons == ["certificate lacks the nonRepudiation key usage"]
    assert check.role == "Medical Doctor"


def test_all_failures_are_reported_together(pki: DevPki) -> None:
    check = check_signing_certificate(
        pki.cert("partner-expired").public_bytes(serialization.Encoding.DER),
        allowed_roles=DOCTORS_ONLY,
        require_role=True,
        at=NOW,
    )
    assert check.reasons == [
        "certificate lacks the nonRepudiation key usage",
        "certificate expired on 2026-03-31T09:00:00Z",
        "certificate has no hcRole (HPKI qualification)",
    ]


def test_naive_time_is_refused(pki: DevPki) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        check_signing_certificate(
            pki.cert("hpki-signer"), allowed_roles=None, require_role=False, at=datetime(2026, 4, 1)
        )


def test_fixture_directory_is_private(pki: DevPki) -> None:
    # The module fixture writes real keys: the directory must stay owner-only.
    assert Path(pki.root).stat().st_mode & 0o077 == 0
