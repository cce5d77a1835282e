"""RFC 4998 Evidence Records that keep DICOM signatures verifiable for decades (R-SIG-6).

A DICOM object's Certified Timestamp (PS3.15 C.12.1) proves when it was signed,
but only while the TSA certificate that signed the token is valid and its hash
algorithm is sound (seed 000 付録2 §14①2(2)).  Sekisho keeps, beside every signed
DICOM record, an Evidence Record (RFC 4998 §3, DER, ``.ers``) that

* protects a *data object group* (RFC 4998 §4.2): the object's bytes as stored
  plus every validation-data item captured while the certificates were valid
  (certificates, CRLs, OCSP responses of the signer's and the TSAs' chains);
* carries those items in ``cryptoInfos`` as the CAdES ``certValues`` and
  ``revocationValues`` attributes (ETSI EN 319 122-1 §5.5.2/5.5.3; RFC 5126
  ``id-aa-ets-certValues``/``id-aa-ets-revocationValues``).  RFC 4998 leaves
  cryptoInfos unprotected; this profile makes every item a member of the
  hashed group, so each is covered by the archive timestamps;
* is created at signing with a first archive timestamp, and renewed by
  *hash-tree renewal* (RFC 4998 §5.2): a new ArchiveTimeStampChain whose first
  ArchiveTimeStamp covers ``H(H(d) || H(atsc))`` for every group member ``d``,
  ``atsc`` being the DER of all earlier chains.  Renewal adds the validation
  data of the timestamps it protects (captured before their certificates
  expire) to the group, and may switch to a stronger hash.

:func:`verify_evidence` checks the record at a given time: the data (and each
validation item) is in every chain, each reduced hash tree leads to its
timestamp's imprint (RFC 4998 §4.3), each ArchiveTimeStamp after the first of a
chain covers the previous one (§5.3, timestamp renewal), every timestamp token
is valid at the time the *next* one was made, the newest at ``now``, and no
hash or key algorithm was deprecated before it was protected.  The validation
uses only the anchors of the configuration plus the captured data, so it still
works after the CA's CRL and OCSP services are gone.

Hash-tree renewal writes ``h(d)`` followed by ``ha`` as RFC 4998 §5.2 step 4
does; the verifier also accepts the pair in binary ascending order, which some
profiles use.  :mod:`signing.renew` decides when to renew and verifies whole
artifacts.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from asn1crypto import algos, cms, core
from asn1crypto import x509 as asn1_x509

from pki.errors import TimestampError, VerificationError
from signing.trust import TrustConfig
from signing.tsa import TimestampToken, TsaClient, verify_token
from signing.validation_data import (
    ValidationData,
    from_attributes,
    to_attributes,
    with_validation_data,
)

__all__ = [
    "AlgorithmPolicy",
    "EvidenceReport",
    "EvidenceRecord",
    "archive_timestamps",
    "create_evidence",
    "key_algorithm_name",
    "load_record",
    "renew_evidence",
    "verify_evidence",
]

_HASHES = {"sha256": hashlib.sha256, "sha384": hashlib.sha384, "sha512": hashlib.sha512}


# ------------------------------------------------------------------ ASN.1 (RFC 4998 §3)
class _PartialHashtree(core.SequenceOf):
    _child_spec = core.OctetString


class _ReducedHashtree(core.SequenceOf):
    _child_spec = _PartialHashtree


class ArchiveTimeStamp(core.Sequence):
    """``ArchiveTimeStamp`` (RFC 4998 §4.1; module uses IMPLICIT TAGS)."""

    _fields = [
        ("digest_algorithm", algos.DigestAlgorithm, {"implicit": 0, "optional": True}),
        ("attributes", cms.CMSAttributes, {"implicit": 1, "optional": True}),
        ("reduced_hashtree", _ReducedHashtree, {"implicit": 2, "optional": True}),
        ("time_stamp", cms.ContentInfo),
    ]


class _ArchiveTimeStampChain(core.SequenceOf):
    _child_spec = ArchiveTimeStamp


class _ArchiveTimeStampSequence(core.SequenceOf):
    _child_spec = _ArchiveTimeStampChain


class _SetOfAny(core.SetOf):
    _child_spec = core.Any


class _Attribute(core.Sequence):
    _fields = [("type", core.ObjectIdentifier), ("values", _SetOfAny)]


class _CryptoInfos(core.SequenceOf):
    _child_spec = _Attribute


def _crypto_infos(vd: ValidationData) -> _CryptoInfos | None:
    attrs = [{"type": oid, "values": [core.Any.load(der)]} for oid, der in to_attributes(vd)]
    return _CryptoInfos(attrs) if attrs else None


def _validation_data_of(record: EvidenceRecord) -> ValidationData:
    infos = record["crypto_infos"]
    if isinstance(infos, core.Void):
        return ValidationData()
    return from_attributes(
        (attr["type"].dotted, value.dump()) for attr in infos for value in attr["values"]
    )


class _DigestAlgorithms(core.SequenceOf):
    _child_spec = algos.DigestAlgorithm


class _EncryptionInfo(core.Sequence):
    _fields = [("type", core.ObjectIdentifier), ("value", core.Any)]


class EvidenceRecord(core.Sequence):
    """``EvidenceRecord`` (RFC 4998 §3)."""

    _fields = [
        ("version", core.Integer),
        ("digest_algorithms", _DigestAlgorithms),
        ("crypto_infos", _CryptoInfos, {"implicit": 0, "optional": True}),
        ("encryption_info", _EncryptionInfo, {"implicit": 1, "optional": True}),
        ("archive_time_stamp_sequence", _ArchiveTimeStampSequence),
    ]


# ------------------------------------------------------------------ hashing (RFC 4998 §4.2)
def _h(algo: str, data: bytes) -> bytes:
    try:
        return _HASHES[algo](data).digest()
    except KeyError:
        raise VerificationError(f"unsupported evidence hash algorithm {algo!r}") from None


def _root(algo: str, leaves: list[bytes]) -> tuple[bytes, list[list[bytes]] | None]:
    """A one-level reduced hash tree over ``leaves`` and its root (§4.2, §4.3 step 3)."""
    if len(leaves) == 1:
        return leaves[0], None
    ordered = sorted(set(leaves))
    return _h(algo, b"".join(ordered)), [ordered]


def _tree_root(algo: str, tree: list[list[bytes]]) -> bytes:
    """Reduce a ``reducedHashtree`` level by level to its root (RFC 4998 §4.3)."""
    current = _h(algo, b"".join(sorted(tree[0])))
    for level in tree[1:]:
        if current not in level:
            raise VerificationError("reduced hash tree is inconsistent")
        current = _h(algo, b"".join(sorted(level)))
    return current


def _chain_input(record: EvidenceRecord, upto: int) -> bytes:
    """DER of the ArchiveTimeStampSequence made of the chains before ``upto`` (§5.2 step 3)."""
    seq = record["archive_time_stamp_sequence"]
    return _ArchiveTimeStampSequence([seq[i] for i in range(upto)]).dump()


def _renewed_leaf(algo: str, item: bytes, ha: bytes | None) -> bytes:
    return _h(algo, item) if ha is None else _h(algo, _h(algo, item) + ha)


async def _archive_timestamp(algo: str, leaves: list[bytes], tsa: TsaClient) -> ArchiveTimeStamp:
    root, tree = _root(algo, leaves)
    result = await tsa.timestamp(digest=root, hash_algorithm=algo)
    ats: dict[str, Any] = {
        "digest_algorithm": {"algorithm": algo},
        "time_stamp": result.token.content_info(),
    }
    if tree is not None:
        ats["reduced_hashtree"] = tree
    return ArchiveTimeStamp(ats)


async def create_evidence(
    data: bytes, validation: ValidationData, tsa: TsaClient, *, hash_algorithm: str = "sha256"
) -> bytes:
    """A new Evidence Record over ``data`` and ``validation`` with one archive timestamp."""
    leaves = [_h(hash_algorithm, d) for d in [data, *validation.items()]]
    ats = await _archive_timestamp(hash_algorithm, leaves, tsa)
    record: dict[str, Any] = {
        "version": 1,
        "digest_algorithms": [{"algorithm": hash_algorithm}],
        "archive_time_stamp_sequence": [[ats]],
    }
    infos = _crypto_infos(validation)
    if infos is not None:
        record["crypto_infos"] = infos
    return EvidenceRecord(record).dump()


def load_record(er_der: bytes) -> EvidenceRecord:
    """Parse an Evidence Record completely, refusing malformed DER now."""
    try:
        record = EvidenceRecord.load(er_der)
        for alg in record["digest_algorithms"]:
            alg["algorithm"].native  # noqa: B018
        for chain in record["archive_time_stamp_sequence"]:
            for ats in chain:
                ats["digest_algorithm"].native  # noqa: B018
                ats["reduced_hashtree"].native  # noqa: B018
                ats["time_stamp"]["content_type"].native  # noqa: B018
        _validation_data_of(record)
        version = record["version"].native
    except (ValueError, TypeError, KeyError) as exc:
        raise VerificationError(f"evidence record is malformed: {exc}") from exc
    if version != 1 or not len(record["archive_time_stamp_sequence"]):
        raise VerificationError("evidence record is not a v1 record with archive timestamps")
    return record


def archive_timestamps(er_der: bytes) -> list[bytes]:
    """The timestamp tokens of every ArchiveTimeStamp, oldest first."""
    record = load_record(er_der)
    return [
        ats["time_stamp"].dump() for chain in record["archive_time_stamp_sequence"] for ats in chain
    ]


async def renew_evidence(
    er_der: bytes,
    data: bytes,
    fresh: ValidationData,
    tsa: TsaClient,
    *,
    hash_algorithm: str = "sha256",
) -> bytes:
    """Hash-tree renewal (RFC 4998 §5.2): append a chain covering data, items and history.

    ``fresh`` is the validation data for the timestamps being protected, taken
    now, while their certificates are valid; it joins the protected group.
    """
    record = load_record(er_der)
    vd = _validation_data_of(record).merged(fresh)
    chains = len(record["archive_time_stamp_sequence"])
    ha = _h(hash_algorithm, _chain_input(record, chains))
    leaves = [_renewed_leaf(hash_algorithm, d, ha) for d in [data, *vd.items()]]
    ats = await _archive_timestamp(hash_algorithm, leaves, tsa)
    algorithms = [a["algorithm"].native for a in record["digest_algorithms"]]
    new: dict[str, Any] = {
        "version": 1,
        "digest_algorithms": [
            {"algorithm": a} for a in dict.fromkeys([*algorithms, hash_algorithm])
        ],
        "archive_time_stamp_sequence": [
            *record["archive_time_stamp_sequence"],
            _ArchiveTimeStampChain([ats]),
        ],
    }
    infos = _crypto_infos(vd)
    if infos is not None:
        new["crypto_infos"] = infos
    return EvidenceRecord(new).dump()


# ------------------------------------------------------------------ algorithms
@dataclass(frozen=True)
class AlgorithmPolicy:
    """Dates after which an algorithm no longer protects anything (configuration).

    Names: hash algorithms (``sha1``, ``sha256``...), RSA keys by modulus size
    (``rsa-1024``, ``rsa-2048``) and EC keys by curve (``ec-secp256r1``).
    """

    deprecations: Mapping[str, datetime] = field(default_factory=dict)

    def expiry(self, *names: str) -> datetime | None:
        dates = [self.deprecations[n] for n in names if n in self.deprecations]
        return min(dates) if dates else None

    def failures(self, names: Iterable[str], protected_at: datetime) -> list[str]:
        """Algorithms among ``names`` deprecated before ``protected_at``."""
        return [
            f"{n} deprecated since {self.deprecations[n]:%Y-%m-%d}, before "
            f"{protected_at:%Y-%m-%d} when it was next protected"
            for n in names
            if n in self.deprecations and self.deprecations[n] <= protected_at
        ]


def key_algorithm_name(cert: asn1_x509.Certificate) -> str:
    key = cert.public_key
    if key.algorithm == "rsa":
        return f"rsa-{key.bit_size}"
    if key.algorithm == "ec":
        return f"ec-{key.curve[1]}"
    return str(key.algorithm)


# ------------------------------------------------------------------ verification
@dataclass
class TimestampStep:
    """One archive timestamp as verified: when, by whom, judged at which time."""

    chain: int
    position: int
    hash_algorithm: str
    time: datetime | None = None
    tsa: str | None = None
    tsa_not_after: datetime | None = None
    tsa_key: str | None = None
    judged_at: datetime | None = None
    ok: bool = False
    problem: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key in ("time", "tsa_not_after", "judged_at"):
            out[key] = out[key].isoformat() if out[key] else None
        return out


@dataclass
class EvidenceReport:
    """What an Evidence Record proves at ``checked_at``."""

    checked_at: datetime
    steps: list[TimestampStep] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    validation_data: ValidationData = field(default_factory=ValidationData)
    #: Items found in cryptoInfos but not covered by any chain (ignored).
    unprotected_items: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems and bool(self.steps) and all(s.ok for s in self.steps)

    @property
    def first_time(self) -> datetime | None:
        return self.steps[0].time if self.steps else None

    @property
    def protected_until(self) -> datetime | None:
        """End of the newest timestamp's protection (its TSA certificate's end)."""
        return self.steps[-1].tsa_not_after if self.steps else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checked_at": self.checked_at.isoformat(),
            "problems": list(self.problems),
            "archive_timestamps": [s.to_dict() for s in self.steps],
            "validation_items": len(self.validation_data),
            "unprotected_items": self.unprotected_items,
        }


async def _newest_token(
    token: bytes, root: bytes, current: TrustConfig, captured: TrustConfig, at: datetime
) -> TimestampToken:
    """The newest timestamp, judged with current revocation data fetched from the CA.

    If the CA cannot be reached, captured data that is itself still current at
    ``at`` (a CRL before its nextUpdate, an OCSP response before its
    nextUpdate) is an equally valid answer: the check is repeated offline.
    Revocation is still required either way (hard-fail is not weakened).
    """
    try:
        return await verify_token(token, current, imprint=root, at=at)
    except TimestampError as online:
        try:
            return await verify_token(token, captured, imprint=root, at=at)
        except TimestampError:
            raise online from None


def _in_first_list(leaf: bytes, ats: ArchiveTimeStamp) -> bool:
    tree = ats["reduced_hashtree"]
    if isinstance(tree, core.Void):
        return False
    return leaf in [bytes(h.native) for h in tree[0]]


def _root_of(ats: ArchiveTimeStamp, algo: str, single_leaf: bytes) -> bytes:
    tree = ats["reduced_hashtree"]
    if isinstance(tree, core.Void):
        return single_leaf
    return _tree_root(algo, [[bytes(h.native) for h in level] for level in tree])


def _leaf_candidates(algo: str, item: bytes, ha: bytes | None) -> list[bytes]:
    if ha is None:
        return [_h(algo, item)]
    hi = _h(algo, item)
    return [_h(algo, hi + ha), _h(algo, b"".join(sorted((hi, ha))))]


async def verify_evidence(
    er_der: bytes,
    data: bytes,
    trust: TrustConfig,
    *,
    now: datetime | None = None,
    algorithms: AlgorithmPolicy | None = None,
    fetch_current: bool | None = None,
) -> EvidenceReport:
    """Verify ``er_der`` over ``data`` at ``now`` (default: the current time).

    Earlier timestamps are judged only from the configured anchors and CRLs and
    the captured data.  The newest is judged at ``now``; ``fetch_current``
    (default: the trust configuration's ``allow_fetching``) lets the validator
    fetch the current revocation status of its TSA certificate.
    """
    now = (now or datetime.now(UTC)).astimezone(UTC)
    algorithms = algorithms or AlgorithmPolicy()
    report = EvidenceReport(checked_at=now)
    try:
        record = load_record(er_der)
    except VerificationError as exc:
        report.problems.append(exc.message)
        return report
    vd = _validation_data_of(record)
    report.validation_data = vd
    items = vd.items()
    protected: set[bytes] = set()
    steps: list[tuple[TimestampStep, bytes, bytes]] = []  # step, token, root
    chains = record["archive_time_stamp_sequence"]
    for ci, chain in enumerate(chains):
        previous_token: bytes | None = None
        for pi, ats in enumerate(chain):
            algo_field = ats["digest_algorithm"]
            algo = "sha256" if isinstance(algo_field, core.Void) else algo_field["algorithm"].native
            step = TimestampStep(chain=ci, position=pi, hash_algorithm=algo)
            token = ats["time_stamp"].dump()
            try:
                if pi == 0:
                    ha = _h(algo, _chain_input(record, ci)) if ci else None
                    candidates = _leaf_candidates(algo, data, ha)
                    hit = next(
                        (c for c in candidates if _in_first_list(c, ats)),
                        candidates[0] if isinstance(ats["reduced_hashtree"], core.Void) else None,
                    )
                    if hit is None:
                        raise VerificationError(f"chain {ci + 1} does not cover the data object")
                    for item in items:
                        if any(_in_first_list(c, ats) for c in _leaf_candidates(algo, item, ha)):
                            protected.add(item)
                    root = _root_of(ats, algo, hit)
                else:
                    assert previous_token is not None
                    leaf = _h(algo, previous_token)
                    if isinstance(ats["reduced_hashtree"], core.Void):
                        root = leaf
                    elif _in_first_list(leaf, ats):
                        root = _root_of(ats, algo, leaf)
                    else:
                        raise VerificationError(
                            f"archive timestamp {pi + 1} of chain {ci + 1} does not cover "
                            "the previous one"
                        )
                steps.append((step, token, root))
            except VerificationError as exc:
                step.problem = exc.message
                report.steps.append(step)
                report.problems.append(exc.message)
                return report
            previous_token = token
    report.unprotected_items = len(set(items) - protected)
    # Only items covered by an archive timestamp are evidence (cryptoInfos itself is not).
    vd = ValidationData(
        tuple(c for c in vd.certificates if c in protected),
        tuple(c for c in vd.crls if c in protected),
        tuple(o for o in vd.ocsps if o in protected),
    )
    report.validation_data = vd
    # Timestamps: read the times first, then judge each at the next one's time.
    times: list[datetime | None] = []
    for _step, token, _root in steps:
        try:
            info = cms.ContentInfo.load(token)["content"]["encap_content_info"]["content"].parsed
            times.append(info["gen_time"].native)
        except (ValueError, KeyError, TypeError):
            times.append(None)
    past = with_validation_data(trust, vd, allow_fetching=False)
    fetch = trust.allow_fetching if fetch_current is None else fetch_current
    current = with_validation_data(trust, vd, allow_fetching=True) if fetch else past
    for i, (step, token, root) in enumerate(steps):
        later = times[i + 1] if i + 1 < len(steps) else None
        step.time = times[i]
        step.judged_at = later or now
        try:
            if later is not None or current is past:
                tok = await verify_token(token, past, imprint=root, at=step.judged_at)
            else:
                tok = await _newest_token(token, root, current, past, step.judged_at)
            step.time, step.tsa = tok.gen_time, tok.tsa_subject
            step.tsa_not_after = tok.tsa_certificate.not_valid_after
            step.tsa_key = key_algorithm_name(tok.tsa_certificate)
            if tok.hash_algorithm != step.hash_algorithm:
                raise TimestampError("timestamp imprint algorithm differs from the record's")
            weak = algorithms.failures([step.hash_algorithm, step.tsa_key], step.judged_at)
            if weak:
                raise TimestampError("; ".join(weak))
            step.ok = True
        except (TimestampError, VerificationError) as exc:
            step.problem = exc.message
            when = "now" if later is None else f"when renewed at {later:%Y-%m-%d %H:%M}"
            report.problems.append(f"archive timestamp {i + 1} not valid {when}: {exc.message}")
        report.steps.append(step)
    return report
