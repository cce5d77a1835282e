"""DICOM Digital Signatures against DCMTK dcmsign and openssl (R-SIG-3, PS3.15 Annex C).

Interoperability is proven both ways with the real peer: dcmsign verifies what
Sekisho signs, Sekisho verifies what dcmsign signs and timestamps, and both
detect the same alterations of a signed attribute and of the pixel data.
"""

# The signing fixtures are imported by name and requested as parameters.
# ruff: noqa: F811

from __future__ import annotations

import subprocess
import urllib.request
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from pki.errors import SigningError, TimestampError
from signing.dicom_sig import sign_dataset, verify_dataset
from signing.dicom_stream import build_signature_stream, eligible_tags, signable
from signing.policy import DicomProfile, RecordPolicy
from signing.signers import open_signer
from signing.tsa import TsaClient
from signing.verify import judge
from tests.signing_fixtures import (  # noqa: F401 - fixtures are used by name
    loopback_tsa,
    make_sc_dataset,
    p12_spec,
    require_tool,
    signing_pki,
    softhsm_token,
    trust,
    tsa_server,
)

pytestmark = pytest.mark.peer


def dcmsign_verify(path: Path, pki, *, require_ts: bool = True) -> subprocess.CompletedProcess:
    cmd = [
        require_tool("dcmsign"),
        "--verify",
        "+rg",
        "+cf",
        str(pki.cert_path("hpki-root-ca")),
        "+cf",
        str(pki.cert_path("root-ca")),
    ]
    if require_ts:
        cmd.append("+tr")
    return subprocess.run([*cmd, str(path)], capture_output=True, text=True, check=False)


async def sekisho_sign(pki, tsa_url, trust, path: Path, out: Path, **kw) -> Dataset:
    ds = pydicom.dcmread(path)
    async with await open_signer(p12_spec(pki)) as signer:
        tsa = TsaClient(tsa_url, trust) if tsa_url else None
        signed = await sign_dataset(ds, signer, kw.pop("profile", "creator"), "1", tsa, **kw)
    signed.save_as(out, enforce_file_format=True)
    return signed


def alter(src: Path, dst: Path, attr: str) -> None:
    ds = pydicom.dcmread(src)
    if attr == "PixelData":
        data = bytearray(ds.PixelData)
        data[10] ^= 0x01
        ds.PixelData = bytes(data)
    else:
        setattr(ds, attr, "Tampered^Name")
    ds.save_as(dst, enforce_file_format=True)


# ---------------------------------------------------------------- pure stream rules


def test_signable_excludes_the_tags_of_ps3_3_c_12_1_1_3_1_1() -> None:
    assert not signable(0x00100000)  # group length
    assert not signable(0x00080001)  # Length to End
    assert not signable(0x00020010)  # file meta
    assert not signable(0xFFFAFFFA)  # Digital Signatures Sequence
    assert not signable(0x4FFE0001)  # MAC Parameters Sequence
    assert not signable(0xFFFCFFFC)  # Data Set Trailing Padding
    assert not signable(0xFFFEE00D)
    assert signable(0x00100010) and signable(0x7FE00010)


def test_eligible_tags_skip_un_and_sequences_containing_un() -> None:
    ds = make_sc_dataset()
    ds.add_new(0x00091010, "UN", b"ab")
    inner = Dataset()
    inner.add_new(0x00111010, "UN", b"cd")
    ds.add_new(0x00400275, "SQ", [inner])  # Request Attributes Sequence holding UN
    tags = [int(t) for t in eligible_tags(ds)]
    assert 0x00091010 not in tags and 0x00400275 not in tags
    assert 0x7FE00010 in tags and 0x0018A001 in tags


def test_stream_encodes_sequences_without_lengths() -> None:
    ds = Dataset()
    item = Dataset()
    item.CodeValue = "AB"
    ds.add_new(0x00081032, "SQ", [item])
    stream, encoded = build_signature_stream(ds, [0x00081032], Dataset())
    assert [int(t) for t in encoded] == [0x00081032]
    assert stream == (
        b"\x08\x00\x32\x10SQ\x00\x00"  # tag, VR, reserved; no length
        b"\xfe\xff\x00\xe0"  # item tag, no length
        b"\x08\x00\x00\x01SH\x02\x00AB"  # the item's element
        b"\xfe\xff\xdd\xe0"  # sequence delimiter, no length
    )


def test_unsignable_tag_in_list_is_refused() -> None:
    with pytest.raises(SigningError, match="may not be signed"):
        build_signature_stream(Dataset(), [0x00080001], Dataset())


# ---------------------------------------------------------------- Sekisho -> dcmsign


async def test_sekisho_signed_object_verifies_with_dcmsign(
    signing_pki, loopback_tsa, trust, tmp_path
) -> None:
    src = tmp_path / "in.dcm"
    make_sc_dataset(src)
    out = tmp_path / "signed.dcm"
    await sekisho_sign(signing_pki, loopback_tsa.url, trust, src, out)
    proc = dcmsign_verify(out, signing_pki)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Signature Verification : OK" in proc.stderr + proc.stdout
    assert "Timestamp Verification : OK" in proc.stderr + proc.stdout

    reports = await verify_dataset(pydicom.dcmread(out), trust)
    (rep,) = reports
    assert rep.intact and rep.chain_ok and rep.revocation == "good"
    assert rep.hc_role == "Medical Doctor"
    assert rep.timestamps[0].ok and "Sekisho Dev TSA" in rep.timestamps[0].tsa
    covered = {c["keyword"] for c in rep.coverage["covered_attributes"]}
    assert {"PixelData", "PatientName", "ContributingEquipmentSequence"} <= covered
    assert rep.details["purpose"] == {
        "code": "1",
        "scheme": "ASTM-sigpurpose",
        "meaning": "Author's Signature",
    }
    assert judge(rep, RecordPolicy(record_type="x", hpki_role_required=True)) == []


@pytest.mark.parametrize("attr", ["PatientName", "PixelData"])
async def test_alteration_detected_by_dcmsign_and_sekisho(
    signing_pki, loopback_tsa, trust, tmp_path, attr
) -> None:
    src = tmp_path / "in.dcm"
    make_sc_dataset(src)
    signed = tmp_path / "signed.dcm"
    await sekisho_sign(signing_pki, loopback_tsa.url, trust, src, signed)
    bad = tmp_path / "altered.dcm"
    alter(signed, bad, attr)
    proc = dcmsign_verify(bad, signing_pki)
    assert proc.returncode != 0
    assert "corrupted" in (proc.stdout + proc.stderr).lower()
    (rep,) = await verify_dataset(pydicom.dcmread(bad), trust)
    assert not rep.intact
    assert "does not match" in rep.integrity_problem
    assert judge(rep, RecordPolicy(record_type="x"))[0].startswith("integrity")


async def test_openssl_ts_verify_accepts_certified_timestamp(
    signing_pki, loopback_tsa, trust, tmp_path
) -> None:
    require_tool("openssl")
    src = tmp_path / "in.dcm"
    make_sc_dataset(src)
    signed = await sekisho_sign(signing_pki, loopback_tsa.url, trust, src, tmp_path / "s.dcm")
    item = signed.DigitalSignaturesSequence[0]
    assert item.CertifiedTimestampType == "CMS_TSP"
    (tmp_path / "sig.bin").write_bytes(bytes(item.Signature))
    (tmp_path / "tst.der").write_bytes(bytes(item.CertifiedTimestamp))
    proc = subprocess.run(
        [
            "openssl",
            "ts",
            "-verify",
            "-data",
            str(tmp_path / "sig.bin"),
            "-in",
            str(tmp_path / "tst.der"),
            "-token_in",
            "-CAfile",
            str(signing_pki.cert_path("root-ca")),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Verification: OK" in proc.stdout


async def test_stream_matches_dcmsign_dump_byte_for_byte(signing_pki, tmp_path) -> None:
    dcmsign = require_tool("dcmsign")
    src = tmp_path / "in.dcm"
    make_sc_dataset(src)
    out, dump = tmp_path / "d.dcm", tmp_path / "dump.bin"
    subprocess.run(
        [
            dcmsign,
            "+s",
            str(signing_pki.key_path("hpki-signer")),
            str(signing_pki.cert_path("hpki-signer")),
            "-pw",
            "+m2",
            "+sp",
            "5",
            "+d",
            str(dump),
            str(src),
            str(out),
        ],
        check=True,
        capture_output=True,
    )
    ds = pydicom.dcmread(out)
    item, mac = ds.DigitalSignaturesSequence[0], ds.MACParametersSequence[0]
    stream, _ = build_signature_stream(ds, mac.DataElementsSigned, item)
    assert stream == dump.read_bytes()


# ---------------------------------------------------------------- dcmsign -> Sekisho


def _post_tsq(url: str, tsq: bytes) -> bytes:
    req = urllib.request.Request(
        url, data=tsq, headers={"Content-Type": "application/timestamp-query"}
    )
    with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 - loopback test TSA
        return resp.read()


def dcmsign_sign_with_timestamp(pki, tsa, src: Path, tmp: Path) -> Path:
    dcmsign = require_tool("dcmsign")
    pending, out = tmp / "pending.dcm", tmp / "dcmsign.dcm"
    tsq, uid, tsr = tmp / "q.tsq", tmp / "uid.dcm", tmp / "r.tsr"
    subprocess.run(
        [
            dcmsign,
            "+s",
            str(pki.key_path("hpki-signer")),
            str(pki.cert_path("hpki-signer")),
            "-pw",
            "+m2",
            "+sp",
            "1",
            "+ts",
            str(tsq),
            str(uid),
            str(src),
            str(pending),
        ],
        check=True,
        capture_output=True,
    )
    tsr.write_bytes(_post_tsq(tsa.url, tsq.read_bytes()))
    subprocess.run(
        [dcmsign, "+t", str(tsq), str(tsr), str(uid), str(pending), str(out)],
        check=True,
        capture_output=True,
    )
    return out


async def test_dcmsign_signed_and_timestamped_object_verifies_with_sekisho(
    signing_pki, loopback_tsa, trust, tmp_path
) -> None:
    src = tmp_path / "in.dcm"
    make_sc_dataset(src)
    out = dcmsign_sign_with_timestamp(signing_pki, loopback_tsa, src, tmp_path)
    assert dcmsign_verify(out, signing_pki).returncode == 0
    (rep,) = await verify_dataset(pydicom.dcmread(out), trust)
    assert rep.intact, rep.integrity_problem
    assert rep.details["mac_algorithm"] == "SHA256"
    assert rep.timestamps and rep.timestamps[0].ok
    assert rep.signing_time == rep.timestamps[0].time
    assert rep.chain_ok and rep.hc_role == "Medical Doctor"
    assert judge(rep, RecordPolicy(record_type="x", hpki_role_required=True)) == []

    for attr in ("PatientName", "PixelData"):
        bad = tmp_path / f"bad-{attr}.dcm"
        alter(out, bad, attr)
        assert dcmsign_verify(bad, signing_pki).returncode != 0
        (bad_rep,) = await verify_dataset(pydicom.dcmread(bad), trust)
        assert not bad_rep.intact


# ---------------------------------------------------------------- signing behaviour


async def test_second_signature_keeps_first_valid(
    signing_pki, loopback_tsa, trust, tmp_path
) -> None:
    src = tmp_path / "in.dcm"
    make_sc_dataset(src)
    first = tmp_path / "one.dcm"
    await sekisho_sign(signing_pki, loopback_tsa.url, trust, src, first)
    second = tmp_path / "two.dcm"
    await sekisho_sign(signing_pki, None, trust, first, second, profile="authorization")
    reps = await verify_dataset(pydicom.dcmread(second), trust)
    assert [r.intact for r in reps] == [True, True]
    assert [r.details["mac_id"] for r in reps] == [0, 1]
    assert dcmsign_verify(second, signing_pki, require_ts=False).returncode == 0


async def test_signing_never_changes_signed_attributes(signing_pki, trust, tmp_path) -> None:
    src = tmp_path / "in.dcm"
    original = make_sc_dataset(src)
    signed = await sekisho_sign(signing_pki, None, trust, src, tmp_path / "s.dcm")
    for elem in original:
        assert signed[elem.tag].value == elem.value
    new = {int(t) for t in signed.keys()} - {int(t) for t in original.keys()}
    assert new == {0x4FFE0001, 0xFFFAFFFA}


async def test_tsa_failure_leaves_dataset_unsigned(signing_pki, loopback_tsa, trust) -> None:
    ds = make_sc_dataset()
    async with await open_signer(p12_spec(signing_pki)) as signer:
        with pytest.raises(TimestampError, match="nonce mismatch"):
            await sign_dataset(
                ds,
                signer,
                DicomProfile.CREATOR,
                "1",
                TsaClient(loopback_tsa.mode_url("wrong-nonce"), trust),
            )
    assert "DigitalSignaturesSequence" not in ds and "MACParametersSequence" not in ds


async def test_creator_profile_requires_uids(signing_pki) -> None:
    ds = make_sc_dataset()
    del ds.StudyInstanceUID
    async with await open_signer(p12_spec(signing_pki)) as signer:
        with pytest.raises(SigningError, match="StudyInstanceUID"):
            await sign_dataset(ds, signer, "creator", "1", None)


async def test_explicit_tag_list_is_completed_by_profile(signing_pki, trust) -> None:
    ds = make_sc_dataset()
    async with await open_signer(p12_spec(signing_pki)) as signer:
        signed = await sign_dataset(ds, signer, "creator", "1", None, tags=[0x00100010])
    listed = {int(t) for t in signed.MACParametersSequence[0].DataElementsSigned}
    assert 0x00100010 in listed and 0x7FE00010 in listed and 0x00080018 in listed
    assert 0x00100020 not in listed  # PatientID was not asked for
    (rep,) = await verify_dataset(signed, trust)
    assert rep.intact and rep.coverage["profile_uncovered"] == []


async def test_ecdsa_signature_verifies_with_dcmsign(signing_pki, trust, tmp_path) -> None:
    """ECDSA P-256 (optional in R-SIG-3): odd-length DER signatures are padded in OB."""
    from pyhanko.sign.signers import SimpleSigner

    from signing.signers import SekishoSigner

    role = "partner-valid-ec"
    simple = SimpleSigner.load(str(signing_pki.key_path(role)), str(signing_pki.cert_path(role)))
    signer = SekishoSigner(simple, backend="pem")
    assert signer.key_algorithm == "ec"
    signed = await sign_dataset(make_sc_dataset(), signer, "creator", "1", None)
    out = tmp_path / "ec.dcm"
    signed.save_as(out, enforce_file_format=True)
    proc = subprocess.run(
        [
            require_tool("dcmsign"),
            "--verify",
            "+rg",
            "+cf",
            str(signing_pki.cert_path("root-ca")),
            "+uf",
            str(signing_pki.cert_path("intermediate-ca")),
            str(out),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (rep,) = await verify_dataset(pydicom.dcmread(out), trust)
    assert rep.intact
    assert not rep.chain_ok  # a TLS partner certificate is no HPKI signer
