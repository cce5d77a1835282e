"""What a pyHanko CMS signature status says about its signer and timestamp.

Shared by the PAdES and CAdES verifiers (R-SIG-8): signer subject and
fingerprint, HPKI role (:func:`describe_signer`, which the DICOM Digital
Signature verifier uses too), the claimed signing time, the signature
timestamp and the time the signature is proven to have existed.
"""

from __future__ import annotations

import hashlib
from typing import Any

from pki import hpki
from pki.errors import SigningError
from signing.report import SignatureReport, TimestampReport
from signing.trust import reason_for_subindication


def describe_signer(report: SignatureReport, cert: Any) -> None:
    """Signer subject, certificate fingerprint and HPKI role of an asn1crypto certificate."""
    report.signer_subject = cert.subject.human_friendly
    report.signer_sha256 = hashlib.sha256(cert.dump()).hexdigest()
    try:
        report.hc_role = hpki.hc_role(cert)
    except SigningError as exc:
        report.details["hc_role_problem"] = exc.message


def describe_signer_and_timestamp(report: SignatureReport, status: Any) -> None:
    """Fill ``report`` from a pyHanko signature status (PAdES or CAdES)."""
    describe_signer(report, status.signing_cert)
    report.claimed_time = status.signer_reported_dt
    tsv = status.timestamp_validity
    if tsv is not None:
        problem = None if tsv.trusted else reason_for_subindication(tsv.trust_problem_indic)
        if not tsv.intact:
            problem = "signature timestamp does not match the signature"
        report.timestamps.append(
            TimestampReport(
                kind="signature",
                ok=tsv.trusted,
                time=tsv.timestamp,
                tsa=tsv.signing_cert.subject.human_friendly,
                problem=problem,
            )
        )
    good = [t.time for t in report.timestamps if t.ok and t.time]
    report.signing_time = good[0] if good else report.claimed_time
