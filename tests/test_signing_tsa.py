"""RFC 3161 client against a real TSA on loopback (R-SIG-5, R-AUD-5).

Every refusal is produced by the real OpenSSL TSA answering a request that the
wrapper altered on the way, never by a response built by hand (STYLE §11).
"""

# The signing fixtures are imported by name and requested as parameters.
# ruff: noqa: F811

from __future__ import annotations

import hashlib
import subprocess
from datetime import timedelta

import pytest
from asn1crypto import tsp

from pki.errors import TimestampError
from signing.trust import TrustConfig
from signing.tsa import (
    SekishoTimeStamper,
    TsaClient,
    build_request,
    check_response,
    verify_token,
)
from tests.signing_fixtures import (  # noqa: F401 - fixtures are used by name
    loopback_tsa,
    require_tool,
    signing_pki,
    softhsm_token,
    trust,
    tsa_server,
)


def test_build_request_has_sha256_imprint_nonce_and_cert_req() -> None:
    req = build_request(b"hello")
    parsed = tsp.TimeStampReq.load(req.der)
    assert parsed["message_imprint"]["hash_algorithm"]["algorithm"].native == "sha256"
    assert parsed["message_imprint"]["hashed_message"].native == hashlib.sha256(b"hello").digest()
    assert parsed["cert_req"].native is True
    assert parsed["nonce"].native == req.nonce
    assert req.nonce.bit_length() >= 57
    assert build_request(b"hello").nonce != req.nonce


def test_build_request_refuses_wrong_digest_length() -> None:
    with pytest.raises(TimestampError, match="digest length"):
        build_request(digest=b"\x00" * 20)


async def test_timestamp_from_real_tsa_is_accepted(loopback_tsa, trust, signing_pki) -> None:
    client = TsaClient(loopback_tsa.url, trust)
    result = await client.timestamp(b"signature bytes")
    token = result.token
    assert token.imprint == hashlib.sha256(b"signature bytes").digest()
    assert "Sekisho Dev TSA" in token.tsa_subject
    assert token.serial > 0
    assert abs(result.skew) < timedelta(seconds=5)
    assert not result.skew_exceeded
    assert client.results == [result]
    # the stored token verifies again later, bound to the same data
    again = await verify_token(token.der, trust, data=b"signature bytes")
    assert again.gen_time == token.gen_time
    with pytest.raises(TimestampError, match="imprint mismatch"):
        await verify_token(token.der, trust, data=b"other bytes")


async def test_openssl_ts_verify_accepts_token(loopback_tsa, trust, signing_pki, tmp_path) -> None:
    require_tool("openssl")
    data = tmp_path / "data.bin"
    data.write_bytes(b"independent check")
    result = await TsaClient(loopback_tsa.url, trust).timestamp(data.read_bytes())
    (tmp_path / "token.der").write_bytes(result.token.der)
    proc = subprocess.run(
        [
            "openssl",
            "ts",
            "-verify",
            "-data",
            str(data),
            "-in",
            str(tmp_path / "token.der"),
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


async def test_wrong_nonce_is_refused(loopback_tsa, trust) -> None:
    client = TsaClient(loopback_tsa.mode_url("wrong-nonce"), trust)
    with pytest.raises(TimestampError, match="nonce mismatch"):
        await client.timestamp(b"data")
    assert client.results == []


async def test_wrong_imprint_is_refused(loopback_tsa, trust) -> None:
    with pytest.raises(TimestampError, match="imprint mismatch"):
        await TsaClient(loopback_tsa.mode_url("wrong-imprint"), trust).timestamp(b"data")


async def test_rejection_status_is_refused(loopback_tsa, trust) -> None:
    with pytest.raises(TimestampError, match="rejection"):
        await TsaClient(loopback_tsa.mode_url("reject"), trust).timestamp(b"data")


async def test_http_error_is_refused(loopback_tsa, trust) -> None:
    with pytest.raises(TimestampError, match="HTTP 500"):
        await TsaClient(loopback_tsa.mode_url("http500"), trust).timestamp(b"data")


async def test_timeout_is_reported_as_unreachable(loopback_tsa, trust) -> None:
    client = TsaClient(loopback_tsa.mode_url("slow"), trust, timeout=0.5)
    with pytest.raises(TimestampError, match="unreachable") as info:
        await client.timestamp(b"data")
    assert info.value.__cause__ is not None


async def test_unreachable_tsa_maps_library_error(trust) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TimestampError, match="unreachable") as info:
        await TsaClient(f"http://127.0.0.1:{port}/tsa", trust, timeout=2).timestamp(b"x")
    assert info.value.__cause__ is not None


async def test_tsa_not_chaining_to_configured_anchor_is_refused(loopback_tsa, signing_pki) -> None:
    other = TrustConfig.from_paths(
        signer_anchors=signing_pki.trust_anchor_paths("hpki"),
        tsa_anchors=[signing_pki.cert_path("hpki-root-ca")],  # not the TSA's root
    )
    with pytest.raises(TimestampError, match="not trusted"):
        await TsaClient(loopback_tsa.url, other).timestamp(b"data")


async def test_skew_beyond_bound_is_flagged(loopback_tsa, trust) -> None:
    req = build_request(b"clock")
    client = TsaClient(loopback_tsa.url, trust)
    body = await client.post(req.der)
    from datetime import UTC, datetime

    future = datetime.now(UTC) + timedelta(minutes=10)
    result = await check_response(
        body, req, trust, sent_at=future, received_at=future, max_skew=timedelta(seconds=30)
    )
    assert result.skew > timedelta(minutes=9)
    assert result.skew_exceeded


async def test_sekisho_timestamper_for_pyhanko(loopback_tsa, trust) -> None:
    client = TsaClient(loopback_tsa.url, trust)
    stamper = SekishoTimeStamper(client)
    digest = hashlib.sha256(b"cms signature").digest()
    token = await stamper.async_timestamp(digest, "sha256")
    info = token["content"]["encap_content_info"]["content"].parsed
    assert info["message_imprint"]["hashed_message"].native == digest
    assert len(client.results) == 1
