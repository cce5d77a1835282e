"""Sekisho signing: HPKI signatures with RFC 3161 timestamps (R-SIG-1..8, R-AUD-5).

Modules, lowest first (none imports :mod:`gateway`):

* :mod:`signing.trust` - HPKI and TSA trust anchors, CRLs, validation contexts;
* :mod:`signing.tsa` - sans-IO RFC 3161 client and its aiohttp edge;
* :mod:`signing.signers` - PKCS#11 and PKCS#12 signer backends;
* :mod:`signing.policy` - per-record-type signing policy and the signer check;
* :mod:`signing.dicom_stream` / :mod:`signing.dicom_sig` - PS3.15 Annex C;
* :mod:`signing.pades` / :mod:`signing.cades` - PAdES B-LTA and CAdES-T;
* :mod:`signing.report` / :mod:`signing.verify` - reports and the verdict;
* :mod:`signing.cli` - what ``sekisho sign`` and ``sekisho verify`` call.
"""
