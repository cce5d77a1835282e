"""RFC 3161 Time-Stamp Protocol client: sans-IO core, thin aiohttp edge (R-SIG-5, R-AUD-5).

The core is two pure steps, like pyHanko's ``timestamps/api.py`` and
``common_utils.handle_tsp_response``:

* :func:`build_request` forms a ``TimeStampReq`` (RFC 3161 §2.4.1) with a
  SHA-256 message imprint, a random 64-bit nonce and ``certReq`` set;
* :func:`check_response` accepts a ``TimeStampResp`` (RFC 3161 §2.4.2) only if
  the PKIStatus is granted or grantedWithMods, the TSTInfo carries the same
  nonce and imprint as the request, the token's CMS signature (RFC 5652 §5.6)
  is valid, and the TSA certificate has the *critical* timeStamping extended
  key usage (RFC 3161 §2.3) and chains to a configured TSA trust anchor.

It also compares the local clock with the token's ``genTime`` and returns the
difference, so that the caller can raise an alert when the skew exceeds the
configured bound (R-AUD-5).  :class:`TsaClient` moves bytes over HTTP
(RFC 3161 §3.4, ``application/timestamp-query``) with explicit timeouts and
re-raises transport failures as :class:`pki.errors.TimestampError`.
:class:`SekishoTimeStamper` plugs the same checks into pyHanko for PAdES and
CAdES signature timestamps.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
from asn1crypto import algos, cms, core, tsp
from asn1crypto import x509 as asn1_x509
from pyhanko.sign.timestamps.api import TimeStamper
from pyhanko.sign.validation.errors import SignatureValidationError
from pyhanko.sign.validation.generic_cms import validate_tst_signed_data

from pki.errors import TimestampError
from signing.trust import TrustConfig, reason_for_subindication

__all__ = [
    "DEFAULT_MAX_SKEW",
    "SekishoTimeStamper",
    "TimestampRequest",
    "TimestampResult",
    "TimestampToken",
    "TsaClient",
    "build_request",
    "check_response",
    "verify_token",
]

#: Default bound for the local-clock/TSA-clock difference (R-AUD-5).
DEFAULT_MAX_SKEW = timedelta(seconds=5)
_HASHES: dict[str, Callable[..., Any]] = {
    "sha256": hashlib.sha256,
    "sha384": hashlib.sha384,
    "sha512": hashlib.sha512,
}
_TIMESTAMP_QUERY = "application/timestamp-query"
_TIMESTAMP_REPLY = "application/timestamp-reply"


def _digest(hash_algorithm: str, data: bytes) -> bytes:
    try:
        return _HASHES[hash_algorithm](data).digest()
    except KeyError as exc:
        raise TimestampError(f"unsupported timestamp hash algorithm {hash_algorithm!r}") from exc


@dataclass(frozen=True)
class TimestampRequest:
    """A DER ``TimeStampReq`` and what the response must echo (RFC 3161 §2.4.1)."""

    der: bytes
    nonce: int
    hash_algorithm: str
    imprint: bytes
    policy_oid: str | None = None


def build_request(
    data: bytes | None = None,
    *,
    digest: bytes | None = None,
    hash_algorithm: str = "sha256",
    nonce: int | None = None,
    policy_oid: str | None = None,
) -> TimestampRequest:
    """Form a ``TimeStampReq`` over ``data`` (or a precomputed ``digest``).

    ``version`` 1, ``messageImprint`` with ``hash_algorithm`` (SHA-256 unless
    told otherwise), a fresh 64-bit ``nonce`` from :mod:`secrets`, ``certReq``
    TRUE so the TSA certificate is in the token (RFC 3161 §2.4.1), and an
    optional ``reqPolicy``.
    """
    if (data is None) == (digest is None):
        raise TimestampError("timestamp request needs exactly one of data or digest")
    imprint = digest if digest is not None else _digest(hash_algorithm, data or b"")
    if hash_algorithm not in _HASHES:
        raise TimestampError(f"unsupported timestamp hash algorithm {hash_algorithm!r}")
    if len(imprint) != _HASHES[hash_algorithm]().digest_size:
        raise TimestampError(f"digest length does not match {hash_algorithm}")
    if nonce is None:
        nonce = secrets.randbits(64) | (1 << 56)  # never shorter than 57 bits
    req: dict[str, object] = {
        "version": "v1",
        "message_imprint": {
            "hash_algorithm": algos.DigestAlgorithm({"algorithm": hash_algorithm}),
            "hashed_message": imprint,
        },
        "nonce": nonce,
        "cert_req": True,
    }
    if policy_oid:
        req["req_policy"] = policy_oid
    der = tsp.TimeStampReq(req).dump()
    return TimestampRequest(der, nonce, hash_algorithm, imprint, policy_oid)


@dataclass(frozen=True)
class TimestampToken:
    """A verified RFC 3161 ``TimeStampToken`` (a CMS ``SignedData`` over ``TSTInfo``)."""

    der: bytes
    gen_time: datetime
    tsa_subject: str
    serial: int
    hash_algorithm: str
    imprint: bytes
    nonce: int | None
    policy_oid: str
    tsa_certificate: asn1_x509.Certificate = field(repr=False, compare=False)

    def content_info(self) -> cms.ContentInfo:
        """The token as an asn1crypto ``ContentInfo`` (what pyHanko embeds)."""
        return cms.ContentInfo.load(self.der)

    def to_dict(self) -> dict[str, object]:
        """JSON-friendly summary for reports and audit records."""
        return {
            "gen_time": self.gen_time.isoformat(),
            "tsa": self.tsa_subject,
            "serial": self.serial,
            "hash_algorithm": self.hash_algorithm,
            "policy": self.policy_oid,
        }


@dataclass(frozen=True)
class TimestampResult:
    """A fresh token plus the clock comparison of R-AUD-5.

    ``skew`` is local time minus ``genTime`` (positive: the local clock is
    ahead).  The local time is the midpoint of the request's round trip, so
    network latency does not count as skew.
    """

    token: TimestampToken
    local_time: datetime
    skew: timedelta
    max_skew: timedelta

    @property
    def skew_exceeded(self) -> bool:
        """Whether the caller must raise a clock-skew alert (R-AUD-5)."""
        return abs(self.skew) > self.max_skew


class _TimeStampResp(core.Sequence):
    """RFC 3161 §2.4.2 ``TimeStampResp``; asn1crypto's own class wrongly makes the
    token mandatory, so a rejection (which carries none) could not be read."""

    _fields = [
        ("status", tsp.PKIStatusInfo),
        ("time_stamp_token", cms.ContentInfo, {"optional": True}),
    ]


def _tsa_eku_is_critical(cert: asn1_x509.Certificate) -> bool:
    """RFC 3161 §2.3: exactly one EKU, ``id-kp-timeStamping``, marked critical."""
    for ext in cert["tbs_certificate"]["extensions"]:
        if ext["extn_id"].native == "extended_key_usage":
            return bool(ext["critical"].native) and ext["extn_value"].native == ["time_stamping"]
    return False


def _signer_certificate(signed_data: cms.SignedData) -> asn1_x509.Certificate:
    infos = signed_data["signer_infos"]
    if len(infos) != 1:
        raise TimestampError(f"timestamp token has {len(infos)} signers; RFC 3161 requires one")
    sid = infos[0]["sid"]
    for choice in signed_data["certificates"] or []:
        cert = choice.chosen
        if not isinstance(cert, asn1_x509.Certificate):
            continue
        if sid.name == "issuer_and_serial_number":
            ias = sid.chosen
            if cert.issuer == ias["issuer"] and cert.serial_number == ias["serial_number"].native:
                return cert
        elif cert.key_identifier == sid.chosen.native:
            return cert
    raise TimestampError("timestamp token does not contain the TSA certificate (certReq ignored)")


def _parse_token(token_der: bytes) -> tuple[cms.SignedData, tsp.TSTInfo]:
    try:
        ci = cms.ContentInfo.load(token_der)
        if ci["content_type"].native != "signed_data":
            raise TimestampError("timestamp token is not a CMS SignedData")
        sd = ci["content"]
        eci = sd["encap_content_info"]
        if eci["content_type"].native != "tst_info":
            raise TimestampError("timestamp token does not encapsulate a TSTInfo")
        info = eci["content"].parsed
        info.native  # noqa: B018 - full parse, refuse malformed DER now
        return sd, info
    except (ValueError, TypeError, KeyError) as exc:
        raise TimestampError(f"timestamp token is malformed: {exc}") from exc


async def verify_token(
    token_der: bytes,
    trust: TrustConfig,
    *,
    data: bytes | None = None,
    imprint: bytes | None = None,
    expected_nonce: int | None = None,
    at: datetime | None = None,
) -> TimestampToken:
    """Verify a stored or fresh ``TimeStampToken`` and return what it attests.

    Checks the message imprint against ``data`` or ``imprint`` (if given), the
    nonce (if expected), the CMS signature (RFC 5652 §5.6), the critical
    timeStamping EKU and the TSA's chain to ``trust.tsa_anchors`` at ``at``
    (default: the token's own ``genTime``, i.e. "the certificate was valid when
    it timestamped", R-SIG-5).  Raises :class:`TimestampError` with the reason.
    """
    sd, info = _parse_token(token_der)
    if info["version"].native != "v1":
        raise TimestampError("unsupported TSTInfo version")
    mi = info["message_imprint"]
    algo = mi["hash_algorithm"]["algorithm"].native
    got_imprint = mi["hashed_message"].native
    if data is not None:
        imprint = _digest(algo, data)
    if imprint is not None and got_imprint != imprint:
        raise TimestampError("timestamp imprint mismatch: token does not cover this data")
    nonce = info["nonce"].native
    if expected_nonce is not None and nonce != expected_nonce:
        raise TimestampError("timestamp nonce mismatch: response does not answer our request")
    gen_time: datetime = info["gen_time"].native
    cert = _signer_certificate(sd)
    if not _tsa_eku_is_critical(cert):
        raise TimestampError(
            "TSA certificate lacks the critical timeStamping extended key usage (RFC 3161 §2.3)"
        )
    vc = trust.tsa_context(at or gen_time)
    try:
        status = await validate_tst_signed_data(sd, vc, lambda _algo: got_imprint)
    except SignatureValidationError as exc:
        raise TimestampError(f"timestamp token signature invalid: {exc}") from exc
    if not (status["intact"] and status["valid"]):
        raise TimestampError("timestamp token signature invalid")
    if status["trust_problem_indic"] is not None or status["validation_path"] is None:
        reason = reason_for_subindication(status["trust_problem_indic"])
        raise TimestampError(f"TSA certificate {reason}: {cert.subject.human_friendly}")
    return TimestampToken(
        der=token_der,
        gen_time=gen_time,
        tsa_subject=cert.subject.human_friendly,
        serial=info["serial_number"].native,
        hash_algorithm=algo,
        imprint=got_imprint,
        nonce=nonce,
        policy_oid=info["policy"].dotted,
        tsa_certificate=cert,
    )


async def check_response(
    response_der: bytes,
    request: TimestampRequest,
    trust: TrustConfig,
    *,
    sent_at: datetime | None = None,
    received_at: datetime | None = None,
    max_skew: timedelta = DEFAULT_MAX_SKEW,
) -> TimestampResult:
    """Accept or refuse a ``TimeStampResp`` for ``request`` (RFC 3161 §2.4.2).

    ``sent_at``/``received_at`` are the local clock readings around the round
    trip (default: now) used for the skew of R-AUD-5.
    """
    try:
        resp = _TimeStampResp.load(response_der)
        status = resp["status"]["status"].native
    except (ValueError, TypeError) as exc:
        raise TimestampError(f"TSA response is not a TimeStampResp: {exc}") from exc
    if status not in ("granted", "granted_with_mods"):
        text = "; ".join(resp["status"]["status_string"].native or [])
        fail = ", ".join(sorted(resp["status"]["fail_info"].native or []))
        raise TimestampError(f"TSA refused the request: status {status} {text} {fail}".strip())
    token = resp["time_stamp_token"]
    if isinstance(token, core.Void):
        raise TimestampError("TSA granted the request but sent no token")
    _sd, info = _parse_token(token.dump())
    policy = info["policy"].dotted
    if request.policy_oid and policy != request.policy_oid:
        raise TimestampError(f"TSA used policy {policy}, not the requested {request.policy_oid}")
    if info["message_imprint"]["hash_algorithm"]["algorithm"].native != request.hash_algorithm:
        raise TimestampError("timestamp imprint mismatch: TSA changed the hash algorithm")
    now = datetime.now(UTC)
    sent = sent_at or now
    received = received_at or now
    tok = await verify_token(
        token.dump(),
        trust,
        imprint=request.imprint,
        expected_nonce=request.nonce,
        at=received,
    )
    local = sent + (received - sent) / 2
    return TimestampResult(tok, local, local - tok.gen_time, max_skew)


class TsaClient:
    """HTTP edge for one configured TSA (RFC 3161 §3.4).

    Holds no session between calls (a timestamp is a single POST); ``timeout``
    bounds connect plus transfer.  Every transport failure becomes
    :class:`TimestampError` ``from`` the library error.
    """

    def __init__(
        self,
        url: str,
        trust: TrustConfig,
        *,
        timeout: float = 10.0,
        max_skew: timedelta = DEFAULT_MAX_SKEW,
        policy_oid: str | None = None,
        max_response_bytes: int = 1 << 20,
    ) -> None:
        self.url = url
        self.trust = trust
        self.timeout = timeout
        self.max_skew = max_skew
        self.policy_oid = policy_oid
        self.max_response_bytes = max_response_bytes
        #: Every accepted result, newest last (the gateway audits and alerts on them).
        self.results: list[TimestampResult] = []

    async def post(self, body: bytes) -> bytes:
        """POST a DER request and return the DER response body."""
        timeout = aiohttp.ClientTimeout(total=self.timeout, connect=min(self.timeout, 5.0))
        headers = {"Content-Type": _TIMESTAMP_QUERY, "Accept": _TIMESTAMP_REPLY}
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.post(self.url, data=body, headers=headers) as resp,
            ):
                if resp.status != 200:
                    raise TimestampError(f"TSA {self.url} answered HTTP {resp.status}")
                ctype = resp.headers.get("Content-Type", "").split(";")[0].strip()
                if ctype != _TIMESTAMP_REPLY:
                    raise TimestampError(f"TSA {self.url} answered content type {ctype!r}")
                data = await resp.content.read(self.max_response_bytes + 1)
                if len(data) > self.max_response_bytes:
                    raise TimestampError(f"TSA {self.url} response exceeds size cap")
                return data
        except TimestampError:
            raise
        except TimeoutError as exc:
            raise TimestampError(f"TSA {self.url} unreachable: timed out") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise TimestampError(f"TSA {self.url} unreachable: {exc}") from exc

    async def timestamp(
        self,
        data: bytes | None = None,
        *,
        digest: bytes | None = None,
        hash_algorithm: str = "sha256",
    ) -> TimestampResult:
        """Request, receive and fully check one timestamp over ``data``/``digest``."""
        req = build_request(
            data, digest=digest, hash_algorithm=hash_algorithm, policy_oid=self.policy_oid
        )
        sent = datetime.now(UTC)
        body = await self.post(req.der)
        received = datetime.now(UTC)
        result = await check_response(
            body, req, self.trust, sent_at=sent, received_at=received, max_skew=self.max_skew
        )
        self.results.append(result)
        return result


class SekishoTimeStamper(TimeStamper):
    """pyHanko ``TimeStamper`` that goes through :class:`TsaClient`'s checks.

    pyHanko's own HTTP timestamper only checks status and nonce; this one adds
    the imprint, signature, EKU and chain checks for PAdES/CAdES signature and
    document timestamps too, and keeps the skew measurements in
    ``client.results``.
    """

    def __init__(self, client: TsaClient) -> None:
        super().__init__(include_nonce=True)
        self.client = client

    async def async_timestamp(self, message_digest: bytes, md_algorithm: str) -> cms.ContentInfo:
        result = await self.client.timestamp(
            digest=message_digest, hash_algorithm=md_algorithm.lower()
        )
        return result.token.content_info()
