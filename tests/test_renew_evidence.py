"""RFC 4998 Evidence Records and renewal decisions at the library level (R-SIG-6).

Objects are signed with the project's own signer and the loopback TSA, then
evidence records are created, renewed, verified and corrupted through
:mod:`signing.evidence` and :mod:`signing.renew` (STYLE lesson 11: hostile
input built with the project's writers).
"""

# The signing fixtures are imported by name and requested as parameters.
# ruff: noqa: F401, F811

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta

import pydicom
import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from pki.errors import SigningError
from signing import dicom_sig
from signing.evidence import (
    AlgorithmPolicy,
    EvidenceRecord,
    create_evidence,
    load_record,
    verify_evidence,
)
from signing.renew import RenewalPolicy, dicom_protection, renew_dicom, verify_dicom_long_term
from signing.signers import open_signer
from signing.tsa import TsaClient
from signing.validation_data import (
    ValidationData,
    collect_validation_data,
    from_attributes,
    to_attributes,
)
from tests.digitize_fixtures import renewal_tsa
from tests.signing_fixtures import (
    loopback_tsa,
    make_sc_dataset,
    p12_spec,
    signing_pki,
    trust,
    tsa_server,
)


@pytest.fixture
async def signed(signing_pki, loopback_tsa, trust):
    """(object bytes, evidence record) for a freshly signed SC object."""
    tsa = TsaClient(loopback_tsa.url, trust)
    async with await open_signer(p12_spec(signing_pki)) as signer:
        ds = await dicom_sig.sign_dataset(make_sc_dataset(), signer, "creator", "1", tsa)
        buf = io.BytesIO()
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)
        data = buf.getvalue()
        token = bytes(ds.DigitalSignaturesSequence[0].CertifiedTimestamp)
        vd = await collect_validation_data(
            trust, at=datetime.now(UTC), signer=signer.certificate, tokens=[token]
        )
    return data, await create_evidence(data, vd, tsa)


async def test_evidence_covers_the_object_and_its_validation_data(signed, trust) -> None:
    data, er = signed
    report = await verify_evidence(er, data, trust)
    assert report.ok, report.problems
    assert report.unprotected_items == 0
    assert len(report.validation_data.certificates) == 4  # signer, HPKI root, TSA, root
    assert len(report.validation_data.crls) == 2
    changed = bytearray(data)
    changed[-1] ^= 1
    bad = await verify_evidence(er, bytes(changed), trust)
    assert not bad.ok and bad.problems == ["chain 1 does not cover the data object"]


async def test_validation_data_round_trips_as_cades_values(signed) -> None:
    _data, er = signed
    record = load_record(er)
    infos = [(a["type"].dotted, v.dump()) for a in record["crypto_infos"] for v in a["values"]]
    vd = from_attributes(infos)
    assert from_attributes(to_attributes(vd)) == vd
    assert {oid for oid, _ in infos} == {"1.2.840.113549.1.9.16.2.23", "1.2.840.113549.1.9.16.2.24"}


async def test_item_slipped_into_crypto_infos_is_not_protected(signed, trust, signing_pki):
    """cryptoInfos is unprotected in RFC 4998: only items of the hashed group count."""
    from signing.evidence import _crypto_infos

    data, er = signed
    record = EvidenceRecord.load(er)
    infos = [(a["type"].dotted, v.dump()) for a in record["crypto_infos"] for v in a["values"]]
    stranger = signing_pki.cert("partner-valid-1").public_bytes(Encoding.DER)
    forged = from_attributes(infos).merged(ValidationData(certificates=(stranger,)))
    new = EvidenceRecord(
        {
            "version": 1,
            "digest_algorithms": record["digest_algorithms"],
            "crypto_infos": _crypto_infos(forged),
            "archive_time_stamp_sequence": record["archive_time_stamp_sequence"],
        }
    ).dump()
    report = await verify_evidence(new, data, trust)
    assert report.ok and report.unprotected_items == 1


async def test_sha256_deprecation_makes_a_record_due_and_sha512_renewal_fixes_it(
    signed, trust, renewal_tsa
) -> None:
    data, er = signed
    soon = datetime.now(UTC) + timedelta(days=3)  # within the dev CRLs' 7-day window
    policy = RenewalPolicy(
        margin=timedelta(days=30),
        algorithms=AlgorithmPolicy({"sha256": soon}),
        hash_algorithm="sha512",
    )
    before = dicom_protection(data, er, policy)
    assert before.expires == soon and "sha256 is deprecated" in before.reason
    assert before.due(datetime.now(UTC), policy.margin)
    renewed = await renew_dicom(data, er, trust, TsaClient(renewal_tsa.url, trust), policy)
    after = dicom_protection(data, renewed, policy)
    assert after.hash_algorithm == "sha512" and after.expires > soon
    record = load_record(renewed)
    assert [a["algorithm"].native for a in record["digest_algorithms"]] == ["sha256", "sha512"]
    later = soon + timedelta(days=1)
    ok = await verify_evidence(renewed, data, trust, now=later, algorithms=policy.algorithms)
    assert ok.ok, ok.problems
    stale = await verify_evidence(er, data, trust, now=later, algorithms=policy.algorithms)
    assert any("sha256 deprecated since" in p for p in stale.problems)


async def test_renewal_with_a_tsa_that_ends_no_later_is_refused(signed, trust, loopback_tsa):
    data, er = signed
    with pytest.raises(SigningError, match="renewal ineffective"):
        await renew_dicom(data, er, trust, TsaClient(loopback_tsa.url, trust), RenewalPolicy())


async def test_renewal_after_the_protection_lapsed_is_refused(signed, trust, renewal_tsa):
    data, er = signed
    end = dicom_protection(data, er, RenewalPolicy()).tsa_not_after
    with pytest.raises(SigningError, match="too late to renew"):
        await renew_dicom(
            data,
            er,
            trust,
            TsaClient(renewal_tsa.url, trust),
            RenewalPolicy(),
            at=end + timedelta(seconds=1),
        )


async def test_long_term_report_names_the_signer_and_the_chain(signed, trust) -> None:
    data, er = signed
    report = await verify_dicom_long_term(data, er, trust)
    assert report.ok, report.problems
    (sig,) = report.signatures
    assert sig["hc_role"] == "Medical Doctor" and sig["intact"]
    assert report.evidence and report.evidence["archive_timestamps"][0]["ok"]
    assert report.protected_until is not None
