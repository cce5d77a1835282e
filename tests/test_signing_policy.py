"""Signing policy configuration and signer refusals with precise reasons (R-SIG-1, R-SIG-2)."""

# The signing fixtures are imported by name and requested as parameters.
# ruff: noqa: F811

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from pki.errors import ConfigurationError, SigningError
from signing.policy import DicomProfile, RecordPolicy, SigningPolicy, check_signer
from signing.signers import SignerSpec
from signing.trust import TrustConfig, load_asn1_certificates
from tests.signing_fixtures import (  # noqa: F401 - fixtures are used by name
    loopback_tsa,
    signing_pki,
    softhsm_token,
    trust,
    tsa_server,
)

POLICY = {
    "digitized_film": {
        "signature_required": True,
        "hpki_role_required": True,
        "allowed_roles": ["Medical Doctor", "Radiological Technologist"],
        "timestamp_required": True,
        "dicom_profile": "creator",
    },
    "referral_letter": {"hpki_role_required": True, "allowed_roles": ["Medical Doctor"]},
    "imported_record": {"signature_required": False, "timestamp_required": False},
}


def test_policy_from_config_builds_frozen_records() -> None:
    policy = SigningPolicy.from_config(POLICY)
    film = policy.for_record("digitized_film")
    assert film.allowed_roles == frozenset({"Medical Doctor", "Radiological Technologist"})
    assert film.dicom_profile is DicomProfile.CREATOR and film.timestamp_required
    assert policy.for_record("imported_record").signature_required is False
    with pytest.raises(AttributeError):
        film.timestamp_required = False  # type: ignore[misc]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"film": {"timestamp_requird": True}},
            r"signing\.policy\.film\.timestamp_requird: unknown key",
        ),
        (
            {"film": {"allowed_roles": "Medical Doctor"}},
            r"signing\.policy\.film\.allowed_roles: expected",
        ),
        ({"film": {"allowed_roles": [3]}}, r"allowed_roles\[0\]: expected a role name"),
        ({"film": {"dicom_profile": "sr"}}, r"dicom_profile: 'sr' is not one of"),
        ({"film": {"default_purpose": "99"}}, r"default_purpose: '99' is not an ASTM"),
        ({"film": {"signature_required": "yes"}}, r"signature_required: expected true or false"),
        ({"film": {"hpki_role_required": True, "allowed_roles": []}}, r"allows no signer"),
    ],
)
def test_policy_config_errors_name_the_key_path(config, message) -> None:
    with pytest.raises(ConfigurationError, match=message):
        SigningPolicy.from_config(config)


def test_unknown_record_type_is_refused() -> None:
    with pytest.raises(SigningError, match="'x-ray' has no signing policy"):
        SigningPolicy.from_config(POLICY).for_record("x-ray")


def test_trust_config_errors_name_the_key_path(signing_pki) -> None:
    with pytest.raises(ConfigurationError, match=r"signing\.trust\.anchors: unknown key"):
        TrustConfig.from_config({"anchors": []})
    with pytest.raises(ConfigurationError, match=r"signing\.trust\.revocation: 'maybe'"):
        TrustConfig.from_config(
            {
                "signer_anchors": [str(signing_pki.cert_path("hpki-root-ca"))],
                "tsa_anchors": [str(signing_pki.cert_path("root-ca"))],
                "revocation": "maybe",
            }
        )


def test_signer_spec_refuses_secrets_in_configuration(signing_pki) -> None:
    with pytest.raises(ConfigurationError, match=r"signing\.signer\.pin: unknown key.*pin_file"):
        SignerSpec.from_config({"kind": "pkcs11", "module": "x.so", "key_id": "01", "pin": "1234"})
    spec = SignerSpec.parse(f"pkcs12:{signing_pki.p12_path('hpki-signer')},password-file=/p")
    assert spec.kind == "pkcs12" and str(spec.password_file) == "/p"
    spec = SignerSpec.parse("pkcs11:module=/lib.so,token=t,key-id=a1b2,pin-file=/pin")
    assert spec.key_id == b"\xa1\xb2" and spec.token_label == "t"


def _cert(pki, role):
    return load_asn1_certificates(pki.cert_path(role))[0]


async def _check(pki, trust, role, policy, *, at=None):
    at = at or datetime.now(UTC)
    return await check_signer(policy, _cert(pki, role), at, trust.signer_context(at))


FILM = RecordPolicy(
    record_type="digitized_film",
    hpki_role_required=True,
    allowed_roles=frozenset({"Medical Doctor"}),
)


async def test_valid_hpki_signer_is_accepted(signing_pki, trust) -> None:
    check = await _check(signing_pki, trust, "hpki-signer", FILM)
    assert check.ok and check.role == "Medical Doctor"
    assert check.chain_ok and check.revocation == "good"


async def test_no_role_where_required_is_refused(signing_pki, trust) -> None:
    check = await _check(signing_pki, trust, "hpki-signer-no-role", FILM)
    assert not check.ok and check.codes == {"no-role"}
    assert "no hcRole" in check.reasons[0]
    lenient = RecordPolicy(record_type="imported_record")
    assert (await _check(signing_pki, trust, "hpki-signer-no-role", lenient)).ok


async def test_role_not_allowed_is_refused(signing_pki, trust) -> None:
    check = await _check(signing_pki, trust, "hpki-signer-technologist", FILM)
    assert check.codes == {"role-not-allowed"}
    assert "'Radiological Technologist' is not allowed" in check.reasons[0]
    with pytest.raises(SigningError, match="not allowed by the signing policy"):
        check.raise_if_refused()


async def test_expired_signer_is_refused(signing_pki, trust) -> None:
    check = await _check(signing_pki, trust, "hpki-signer-expired", FILM)
    assert "expired" in check.codes and check.chain_ok
    assert any("expired" in r for r in check.reasons)


async def test_revoked_signer_is_refused(signing_pki, trust) -> None:
    check = await _check(signing_pki, trust, "hpki-signer-revoked", FILM)
    assert check.codes == {"revoked"} and check.revocation == "revoked"
    assert "revoked" in check.reasons[0]


async def test_signer_without_nonrepudiation_is_refused(signing_pki, trust) -> None:
    check = await _check(signing_pki, trust, "hpki-signer-no-nonrep", FILM)
    assert "no-nonrepudiation" in check.codes


async def test_untrusted_signer_is_refused(signing_pki) -> None:
    wrong = TrustConfig.from_paths(
        signer_anchors=[signing_pki.cert_path("root-ca")],  # not the HPKI root
        tsa_anchors=[signing_pki.cert_path("root-ca")],
    )
    check = await _check(signing_pki, wrong, "hpki-signer", FILM)
    assert check.codes == {"not-trusted"} and not check.chain_ok
    assert "not trusted" in check.reasons[0]


async def test_revocation_from_crl_distribution_point_over_http(signing_pki, loopback_tsa) -> None:
    """No preloaded CRLs: the validator fetches the CRL named in the certificate."""
    fetching = TrustConfig.from_paths(
        signer_anchors=signing_pki.trust_anchor_paths("hpki"),
        tsa_anchors=signing_pki.trust_anchor_paths("tsa"),
        allow_fetching=True,
    )
    revoked = await _check(signing_pki, fetching, "hpki-signer-revoked", FILM)
    assert revoked.codes == {"revoked"} and revoked.revocation == "revoked"
    good = await _check(signing_pki, fetching, "hpki-signer", FILM)
    assert good.ok and good.revocation == "good"
