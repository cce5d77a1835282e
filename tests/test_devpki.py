"""The development PKI generator builds exactly the hierarchy the tests rely on.

STYLE §5: generated test PKI, never committed keys.  Certificates are checked
both with ``cryptography`` and with an independent implementation (the
``openssl verify`` command, STYLE §6) so that a profile mistake cannot hide
behind our own parser.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from datetime import UTC, datetime, timedelta
from ipaddress import ip_address
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID

from pki import devpki
from pki.certs import (
    check_private_key_permissions,
    fingerprint_sha256,
    key_matches_certificate,
    load_certificate,
    load_pem_certificates,
    write_private_key,
)
from pki.devpki import DevPki
from pki.errors import ConfigurationError
from pki.hpki import hc_role

#: Pinned clock (STYLE §5); openssl is pinned to it too with ``-attime``.
NOW = datetime(2026, 4, 1, 9, 0, 0, tzinfo=UTC)
CRL_BASE = "http://127.0.0.1:18080/crl"
OCSP_URL = "http://127.0.0.1:18081/ocsp"

EXPECTED_ROLES = {
    "root-ca", "intermediate-ca", "gateway-server",
    "partner-valid-1", "partner-valid-2", "partner-valid-ec", "partner-expired",
    "partner-not-yet-valid", "partner-revoked", "partner-wrong-eku", "partner-unknown-ca",
    "unknown-root-ca", "storage-provider",
    "staff-reception-1", "staff-operator-1", "staff-admin-1", "staff-auditor-1",
    "hpki-root-ca", "hpki-signer", "hpki-signer-technologist", "hpki-signer-no-role",
    "hpki-signer-expired", "hpki-signer-revoked", "hpki-signer-no-nonrep",
    "tsa", "ocsp-responder",
}  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    out = tmp_path_factory.mktemp("devpki") / "pki"
    return devpki.generate(out, now=NOW, crl_url_base=CRL_BASE + "/", ocsp_url=OCSP_URL)


def _ext(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> x509.Extension[x509.ExtensionType]:
    return cert.extensions.get_extension_for_oid(oid)


# ---------------------------------------------------------------- manifest


def test_manifest_lists_every_role_with_consistent_metadata(pki: DevPki) -> None:
    manifest = pki.manifest
    assert manifest["version"] == 1
    assert manifest["generated_at"] == "2026-04-01T09:00:00Z"
    assert set(pki.roles) == EXPECTED_ROLES
    assert len(pki.roles) == len(EXPECTED_ROLES), "a role is listed twice"
    for entry in manifest["certificates"]:
        role = entry["role"]
        cert_file, key_file = pki.root / entry["cert"], pki.root / entry["key"]
        assert cert_file.is_file() and key_file.is_file(), role
        assert not Path(entry["cert"]).is_absolute(), "manifest paths are relative"
        cert = load_certificate(cert_file)
        assert entry["sha256"] == fingerprint_sha256(cert) == pki.fingerprint(role)
        assert int(entry["serial"], 16) == cert.serial_number == pki.serial(role)
        assert entry["subject"] == cert.subject.rfc4514_string()
        assert entry["not_after"] == cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
        assert entry["issuer_role"] in EXPECTED_ROLES
        assert cert.issuer == pki.cert(entry["issuer_role"]).subject, role
        assert entry["purpose"]
        for optional in ("chain", "p12", "p12_pass"):
            if optional in entry:
                assert (pki.root / entry[optional]).is_file(), (role, optional)
    for crl in manifest["crls"]:
        assert (pki.root / crl["pem"]).is_file() and (pki.root / crl["der"]).is_file()
    assert {c["issuer_role"] for c in manifest["crls"]} == {
        "root-ca",
        "intermediate-ca",
        "hpki-root-ca",
    }
    assert manifest["trust"] == {
        "partners": ["root-ca"],
        "hpki": ["hpki-root-ca"],
        "tsa": ["root-ca"],
    }


def test_load_reads_back_the_same_pki(pki: DevPki) -> None:
    loaded = devpki.load(pki.root)
    assert loaded.manifest == pki.manifest
    assert loaded.fingerprint("partner-valid-1") == pki.fingerprint("partner-valid-1")


def test_load_refuses_a_directory_without_manifest(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="manifest"):
        devpki.load(tmp_path)


def test_generate_refuses_non_empty_directory_without_manifest(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("not ours")
    with pytest.raises(ConfigurationError, match="not empty"):
        devpki.generate(tmp_path, now=NOW)
    assert (tmp_path / "precious.txt").read_text() == "not ours"
    assert not (tmp_path / "root-ca.key.pem").exists()


def test_regenerating_replaces_keys_and_honours_server_names(tmp_path: Path) -> None:
    first = devpki.generate(tmp_path / "pki", now=NOW)
    second = devpki.generate(
        tmp_path / "pki", now=NOW, server_names=("gateway.hospital.example",), server_ips=()
    )
    assert first.manifest["certificates"][0]["sha256"] != second.fingerprint("root-ca")
    san = _ext(second.cert("gateway-server"), ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    assert isinstance(san, x509.SubjectAlternativeName)
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "gateway.hospital.example"]
    assert san.get_values_for_type(x509.IPAddress) == []
    # Without URLs there is neither a CRL distribution point nor an AIA.
    leaf = second.cert("partner-valid-1")
    oids = {e.oid for e in leaf.extensions}
    assert ExtensionOID.CRL_DISTRIBUTION_POINTS not in oids
    assert ExtensionOID.AUTHORITY_INFORMATION_ACCESS not in oids


# ----------------------------------------------------------------- key files


def test_secret_files_are_owner_only(pki: DevPki) -> None:
    assert stat.S_IMODE(pki.root.stat().st_mode) == 0o700
    secrets = [pki.key_path(r) for r in pki.roles]
    secrets += [pki.p12_path(r) for r in devpki.HPKI_SIGNER_ROLES]
    secrets += [pki.root / pki.entry(r)["p12_pass"] for r in devpki.HPKI_SIGNER_ROLES]
    for path in secrets:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        check_private_key_permissions(path)  # does not raise
    assert not list(pki.root.glob(".*.tmp")), "temporary files were left behind"


def test_write_private_key_is_owner_only_even_with_a_permissive_umask(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    previous = os.umask(0)
    try:
        write_private_key(tmp_path / "k.pem", key)
        write_private_key(tmp_path / "k.pem", key)  # replacing an existing file
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "k.pem").stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["k.pem"]
    loaded = serialization.load_pem_private_key((tmp_path / "k.pem").read_bytes(), None)
    assert loaded.private_numbers() == key.private_numbers()  # type: ignore[union-attr]


def test_check_private_key_permissions_refuses_group_readable(tmp_path: Path) -> None:
    key = tmp_path / "k.pem"
    key.write_bytes(b"x")
    key.chmod(0o640)
    with pytest.raises(ConfigurationError, match="0640"):
        check_private_key_permissions(key)


def test_every_key_matches_its_certificate_and_no_other(pki: DevPki) -> None:
    for role in pki.roles:
        assert key_matches_certificate(pki.key_path(role), pki.cert_path(role)), role
    assert not key_matches_certificate(
        pki.key_path("partner-valid-1"), pki.cert_path("partner-valid-2")
    )
    # A chain file's first certificate is the leaf.
    assert key_matches_certificate(pki.key_path("gateway-server"), pki.chain_path("gateway-server"))
    chain = load_pem_certificates(pki.chain_path("gateway-server"))
    assert [c.subject for c in chain] == [
        pki.cert("gateway-server").subject,
        pki.cert("intermediate-ca").subject,
    ]


def test_key_types(pki: DevPki) -> None:
    ec_key = pki.private_key("partner-valid-ec")
    assert isinstance(ec_key, ec.EllipticCurvePrivateKey)
    assert ec_key.curve.name == "secp256r1"
    rsa_key = pki.private_key("partner-valid-1")
    assert isinstance(rsa_key, rsa.RSAPrivateKey) and rsa_key.key_size == 2048


def test_hpki_pkcs12_bundles_open_with_their_password_only(pki: DevPki) -> None:
    for role in devpki.HPKI_SIGNER_ROLES:
        data = pki.p12_path(role).read_bytes()
        bundle = pkcs12.load_pkcs12(data, pki.p12_password(role))
        assert bundle.cert is not None and bundle.key is not None
        assert bundle.cert.certificate == pki.cert(role)
        assert [c.certificate for c in bundle.additional_certs] == [pki.cert("hpki-root-ca")]
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        der = serialization.Encoding.DER
        assert bundle.key.public_key().public_bytes(der, spki) == pki.cert(
            role
        ).public_key().public_bytes(der, spki)
    with pytest.raises(ValueError):
        pkcs12.load_pkcs12(pki.p12_path("hpki-signer").read_bytes(), b"wrong password")


# ------------------------------------------------------------------ profiles


def test_gateway_server_profile(pki: DevPki) -> None:
    cert = pki.cert("gateway-server")
    cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    assert [a.value for a in cn] == ["Sekisho Gateway"]
    san = _ext(cert, ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    assert isinstance(san, x509.SubjectAlternativeName)
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ip_address("127.0.0.1"),
        ip_address("::1"),
    }
    eku = _ext(cert, ExtensionOID.EXTENDED_KEY_USAGE).value
    assert isinstance(eku, x509.ExtendedKeyUsage)
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    ku = _ext(cert, ExtensionOID.KEY_USAGE).value
    assert isinstance(ku, x509.KeyUsage)
    assert ku.digital_signature and ku.key_encipherment and not ku.key_cert_sign


def test_validity_periods_are_relative_to_the_pinned_clock(pki: DevPki) -> None:
    valid = pki.cert("partner-valid-1")
    assert valid.not_valid_before_utc == NOW - timedelta(days=1)
    assert valid.not_valid_after_utc == NOW - timedelta(days=1) + timedelta(days=730)
    expired = pki.cert("partner-expired")
    assert expired.not_valid_after_utc == NOW - timedelta(days=1)
    assert expired.not_valid_before_utc < expired.not_valid_after_utc
    future = pki.cert("partner-not-yet-valid")
    assert future.not_valid_before_utc == NOW + timedelta(days=30)
    assert pki.cert("hpki-signer-expired").not_valid_after_utc == NOW - timedelta(days=1)
    root = pki.cert("root-ca")
    assert (root.not_valid_after_utc - root.not_valid_before_utc).days >= 3652


def test_ca_constraints_and_key_identifiers(pki: DevPki) -> None:
    bc = _ext(pki.cert("intermediate-ca"), ExtensionOID.BASIC_CONSTRAINTS)
    assert bc.critical and bc.value == x509.BasicConstraints(ca=True, path_length=0)
    for role in ("root-ca", "hpki-root-ca", "unknown-root-ca"):
        cert = pki.cert(role)
        assert cert.issuer == cert.subject
        assert _ext(cert, ExtensionOID.BASIC_CONSTRAINTS).value == x509.BasicConstraints(
            ca=True, path_length=None
        )
    for role in pki.roles:
        cert = pki.cert(role)
        issuer = pki.cert(pki.entry(role)["issuer_role"])
        aki = _ext(cert, ExtensionOID.AUTHORITY_KEY_IDENTIFIER).value
        issuer_ski = _ext(issuer, ExtensionOID.SUBJECT_KEY_IDENTIFIER).value
        assert isinstance(aki, x509.AuthorityKeyIdentifier)
        assert isinstance(issuer_ski, x509.SubjectKeyIdentifier)
        assert aki.key_identifier == issuer_ski.digest, role
        cert.verify_directly_issued_by(issuer)  # raises if the signature is wrong


def test_partner_staff_and_service_profiles(pki: DevPki) -> None:
    def eku(role: str) -> set[x509.ObjectIdentifier]:
        value = _ext(pki.cert(role), ExtensionOID.EXTENDED_KEY_USAGE).value
        assert isinstance(value, x509.ExtendedKeyUsage)
        return set(value)

    for role in devpki.PARTNER_ROLES:
        if role != "partner-wrong-eku":
            assert eku(role) == {ExtendedKeyUsageOID.CLIENT_AUTH}, role
    assert eku("partner-wrong-eku") == {ExtendedKeyUsageOID.EMAIL_PROTECTION}
    assert eku("storage-provider") == {ExtendedKeyUsageOID.CLIENT_AUTH}
    org = x509.NameOID.ORGANIZATION_NAME
    assert pki.cert("partner-valid-1").subject.get_attributes_for_oid(org)[0].value == (
        "Regional Hospital A"
    )
    assert pki.cert("partner-valid-2").subject.get_attributes_for_oid(org)[0].value == (
        "Regional Hospital B"
    )
    for role in devpki.STAFF_ROLES:
        assert eku(role) == {
            ExtendedKeyUsageOID.CLIENT_AUTH,
            ExtendedKeyUsageOID.EMAIL_PROTECTION,
        }
        subject = pki.cert(role).subject
        assert subject.get_attributes_for_oid(org)[0].value == "Sekisho Demo Hospital"
    assert eku("ocsp-responder") == {ExtendedKeyUsageOID.OCSP_SIGNING}
    ocsp_ext = {e.oid for e in pki.cert("ocsp-responder").extensions}
    assert ExtensionOID.OCSP_NO_CHECK in ocsp_ext


def test_tsa_has_critical_timestamping_eku(pki: DevPki) -> None:
    cert = pki.cert("tsa")
    ext = _ext(cert, ExtensionOID.EXTENDED_KEY_USAGE)
    assert ext.critical, "RFC 3161 §2.3 requires the EKU to be critical"
    assert isinstance(ext.value, x509.ExtendedKeyUsage)
    assert list(ext.value) == [ExtendedKeyUsageOID.TIME_STAMPING]
    ku = _ext(cert, ExtensionOID.KEY_USAGE).value
    assert isinstance(ku, x509.KeyUsage)
    assert ku.digital_signature and ku.content_commitment
    assert cert.issuer == pki.cert("root-ca").subject


def test_hpki_signers_carry_hc_role_and_key_usage(pki: DevPki) -> None:
    signer = pki.cert("hpki-signer")
    sda = _ext(signer, ExtensionOID.SUBJECT_DIRECTORY_ATTRIBUTES)
    assert not sda.critical
    assert hc_role(signer) == "Medical Doctor"
    assert hc_role(pki.cert("hpki-signer-technologist")) == "Radiological Technologist"
    no_role = {e.oid for e in pki.cert("hpki-signer-no-role").extensions}
    assert ExtensionOID.SUBJECT_DIRECTORY_ATTRIBUTES not in no_role
    ku = _ext(signer, ExtensionOID.KEY_USAGE).value
    assert isinstance(ku, x509.KeyUsage) and ku.content_commitment and ku.digital_signature
    weak = _ext(pki.cert("hpki-signer-no-nonrep"), ExtensionOID.KEY_USAGE).value
    assert isinstance(weak, x509.KeyUsage) and not weak.content_commitment
    assert hc_role(pki.cert("hpki-signer-no-nonrep")) == "Medical Doctor"
    assert signer.issuer == pki.cert("hpki-root-ca").subject


def test_revocation_pointers_follow_the_issuer(pki: DevPki) -> None:
    cdp = _ext(pki.cert("partner-valid-1"), ExtensionOID.CRL_DISTRIBUTION_POINTS).value
    assert isinstance(cdp, x509.CRLDistributionPoints)
    assert [n.value for n in cdp[0].full_name or []] == [f"{CRL_BASE}/intermediate-ca.crl"]
    hpki_cdp = _ext(pki.cert("hpki-signer"), ExtensionOID.CRL_DISTRIBUTION_POINTS).value
    assert isinstance(hpki_cdp, x509.CRLDistributionPoints)
    assert [n.value for n in hpki_cdp[0].full_name or []] == [f"{CRL_BASE}/hpki-root-ca.crl"]
    aia = _ext(pki.cert("partner-valid-1"), ExtensionOID.AUTHORITY_INFORMATION_ACCESS).value
    assert isinstance(aia, x509.AuthorityInformationAccess)
    assert [d.access_location.value for d in aia] == [OCSP_URL]


# ---------------------------------------------------------------------- CRLs


def test_intermediate_crl_revokes_exactly_partner_revoked(pki: DevPki) -> None:
    crl = pki.crl("intermediate-ca")
    assert [r.serial_number for r in crl] == [pki.serial("partner-revoked")]
    assert crl.get_revoked_certificate_by_serial_number(pki.serial("partner-valid-1")) is None
    intermediate_key = pki.cert("intermediate-ca").public_key()
    assert isinstance(intermediate_key, rsa.RSAPublicKey)
    assert crl.is_signature_valid(intermediate_key)
    root_key = pki.cert("root-ca").public_key()
    assert isinstance(root_key, rsa.RSAPublicKey)
    assert not crl.is_signature_valid(root_key)
    assert crl.last_update_utc == NOW - timedelta(hours=1)
    assert crl.next_update_utc == NOW + timedelta(days=7)
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value
    assert number.crl_number >= 1
    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = pki.cert("intermediate-ca").extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert aki.key_identifier == ski.value.digest
    pem = x509.load_pem_x509_crl(pki.crl_path("intermediate-ca").read_bytes())
    assert pem == crl


def test_other_crls(pki: DevPki) -> None:
    hpki = pki.crl("hpki-root-ca")
    assert [r.serial_number for r in hpki] == [pki.serial("hpki-signer-revoked")]
    assert len(list(pki.crl("root-ca"))) == 0
    crl_entries = {c["issuer_role"]: c["revoked_roles"] for c in pki.manifest["crls"]}
    assert crl_entries["intermediate-ca"] == ["partner-revoked"]
    assert crl_entries["hpki-root-ca"] == ["hpki-signer-revoked"]
    assert crl_entries["root-ca"] == []


# ------------------------------------------------- independent peer: openssl

openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")


def _openssl_verify(pki: DevPki, role: str, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        "openssl", "verify", "-attime", str(int(NOW.timestamp())),
        "-CAfile", str(pki.cert_path("root-ca")),
        "-untrusted", str(pki.cert_path("intermediate-ca")),
        *extra, str(pki.cert_path(role)),
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)


@pytest.mark.peer
@openssl
def test_openssl_accepts_valid_partner_and_rejects_unknown_ca(pki: DevPki) -> None:
    ok = _openssl_verify(pki, "partner-valid-1", "-purpose", "sslclient")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.strip().endswith(": OK")
    ec_ok = _openssl_verify(pki, "partner-valid-ec", "-purpose", "sslclient")
    assert ec_ok.returncode == 0, ec_ok.stdout + ec_ok.stderr
    unknown = _openssl_verify(pki, "partner-unknown-ca")
    assert unknown.returncode != 0
    assert "unable to get local issuer certificate" in unknown.stdout + unknown.stderr


@pytest.mark.peer
@openssl
def test_openssl_rejects_expired_future_and_wrong_eku(pki: DevPki) -> None:
    expired = _openssl_verify(pki, "partner-expired")
    assert expired.returncode != 0 and "certificate has expired" in expired.stdout + expired.stderr
    future = _openssl_verify(pki, "partner-not-yet-valid")
    assert future.returncode != 0
    assert "certificate is not yet valid" in future.stdout + future.stderr
    wrong = _openssl_verify(pki, "partner-wrong-eku", "-purpose", "sslclient")
    assert wrong.returncode != 0
    assert "certificate purpose" in wrong.stdout + wrong.stderr  # X509_V_ERR_INVALID_PURPOSE
    server = _openssl_verify(pki, "gateway-server", "-purpose", "sslserver")
    assert server.returncode == 0, server.stdout + server.stderr


@pytest.mark.peer
@openssl
def test_openssl_crl_check_rejects_revoked_partner(pki: DevPki) -> None:
    crl = ["-crl_check", "-CRLfile", str(pki.crl_path("intermediate-ca"))]
    revoked = _openssl_verify(pki, "partner-revoked", *crl)
    assert revoked.returncode != 0
    assert "certificate revoked" in revoked.stdout + revoked.stderr
    # The same CRL does not hit a certificate that is not on it.
    valid = _openssl_verify(pki, "partner-valid-1", *crl)
    assert valid.returncode == 0, valid.stdout + valid.stderr
