"""Signer backends behind one interface: PKCS#11 tokens and PKCS#12 files (R-SIG-7).

In production the signer's key stays on the HPKI card or a token and is used
through PKCS#11 (python-pkcs11 via pyHanko's ``PKCS11Signer``); PKCS#12 files
are for development.  Either way the result is a :class:`SekishoSigner` that

* computes raw RSASSA-PKCS1-v1_5 (RFC 8017 §8.2) or ECDSA signatures over
  SHA-256 for DICOM Digital Signatures (PS3.15 Annex C), and
* is a pyHanko ``Signer`` for CMS (RFC 5652), CAdES (ETSI EN 319 122) and
  PAdES (ETSI EN 319 142) signatures.

Secrets never come from the configuration file (R-OPS-2): the PKCS#12
password and the token PIN are read from files that only their owner may
access (mode 0600/0400, checked), or the PIN is asked for by a prompt callback.
"""

from __future__ import annotations

import asyncio
import getpass
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from asn1crypto import x509 as asn1_x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric import padding as asym_padding
from pyhanko.sign.general import SigningError as PyHankoSigningError
from pyhanko.sign.signers import Signer, SimpleSigner

from pki.certs import check_private_key_permissions
from pki.errors import ConfigurationError, SigningError
from signing.trust import load_asn1_certificates

__all__ = [
    "PinPrompt",
    "SekishoSigner",
    "SignerSpec",
    "open_signer",
    "read_secret_file",
]

#: Called with a prompt text, returns the PIN (e.g. :func:`getpass.getpass`).
PinPrompt = Callable[[str], str]


def read_secret_file(path: Path | str) -> bytes:
    """A password or PIN from a file readable by its owner only (R-OPS-2).

    The trailing newline an editor adds is removed; nothing else is.
    """
    check_private_key_permissions(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read secret file {path}: {exc.strerror}") from exc
    return data.rstrip(b"\r\n")


@dataclass(frozen=True)
class SignerSpec:
    """Where the signing key is; never the secret itself.

    ``kind="pkcs12"``: ``pkcs12`` file and ``password_file``.
    ``kind="pkcs11"``: ``module`` (the PKCS#11 library), ``token_label`` or
    ``slot``, the key by ``key_id`` (hex) and/or ``key_label``, the certificate
    by ``cert_id``/``cert_label`` on the token or ``cert_file``, and the PIN
    from ``pin_file`` or a prompt (``pin_prompt=True``).
    ``chain_files`` adds intermediates to embed in CMS signatures.
    """

    kind: Literal["pkcs12", "pkcs11"]
    pkcs12: Path | None = None
    password_file: Path | None = None
    module: str | None = None
    token_label: str | None = None
    slot: int | None = None
    key_id: bytes | None = None
    key_label: str | None = None
    cert_id: bytes | None = None
    cert_label: str | None = None
    cert_file: Path | None = None
    pin_file: Path | None = None
    pin_prompt: bool = False
    chain_files: tuple[Path, ...] = field(default_factory=tuple)

    _KEYS = frozenset(
        {
            "kind",
            "pkcs12",
            "password_file",
            "module",
            "token_label",
            "slot",
            "key_id",
            "key_label",
            "cert_id",
            "cert_label",
            "cert_file",
            "pin_file",
            "pin_prompt",
            "chain_files",
        }
    )

    def __post_init__(self) -> None:
        if self.kind == "pkcs12":
            if self.pkcs12 is None or self.password_file is None:
                raise ConfigurationError("pkcs12 signer needs 'pkcs12' and 'password_file'")
        elif self.kind == "pkcs11":
            if not self.module:
                raise ConfigurationError("pkcs11 signer needs 'module' (the PKCS#11 library)")
            if self.key_id is None and self.key_label is None:
                raise ConfigurationError("pkcs11 signer needs 'key_id' or 'key_label'")
            if self.pin_file is None and not self.pin_prompt:
                raise ConfigurationError("pkcs11 signer needs 'pin_file' or 'pin_prompt: true'")
        else:
            raise ConfigurationError(f"signer kind {self.kind!r} is not pkcs12 or pkcs11")

    @classmethod
    def from_config(cls, mapping: Mapping[str, Any], path: str = "signing.signer") -> SignerSpec:
        """Build from configuration; unknown keys (e.g. a ``pin``) are refused."""
        if not isinstance(mapping, Mapping):
            raise ConfigurationError(f"{path}: expected a mapping")
        for key in mapping:
            if key not in cls._KEYS:
                hint = (
                    " (secrets belong in a file: use pin_file/password_file)"
                    if key in ("pin", "password", "passphrase")
                    else ""
                )
                raise ConfigurationError(f"{path}.{key}: unknown key{hint}")
        kw: dict[str, Any] = dict(mapping)
        for key in ("pkcs12", "password_file", "cert_file", "pin_file"):
            if kw.get(key) is not None:
                kw[key] = Path(kw[key])
        for key in ("key_id", "cert_id"):
            if kw.get(key) is not None:
                try:
                    kw[key] = bytes.fromhex(str(kw[key]))
                except ValueError as exc:
                    raise ConfigurationError(f"{path}.{key}: not a hex string") from exc
        kw["chain_files"] = tuple(Path(p) for p in kw.get("chain_files", ()))
        try:
            return cls(**kw)
        except ConfigurationError as exc:
            raise ConfigurationError(f"{path}: {exc.message}") from exc
        except TypeError as exc:
            raise ConfigurationError(f"{path}: {exc}") from exc

    @classmethod
    def parse(cls, text: str) -> SignerSpec:
        """Parse the CLI form ``pkcs12:FILE,password-file=PATH`` or
        ``pkcs11:module=LIB,token=LABEL,key-id=HEX,cert-file=PATH,pin-file=PATH``."""
        kind, _, rest = text.partition(":")
        items: dict[str, Any] = {"kind": kind}
        for n, part in enumerate(p for p in rest.split(",") if p):
            key, sep, value = part.partition("=")
            if not sep:
                if kind == "pkcs12" and n == 0:
                    items["pkcs12"] = key
                    continue
                raise ConfigurationError(f"--signer: {part!r} is not key=value")
            key = {"token": "token_label", "pin-prompt": "pin_prompt"}.get(key, key)
            items[key.replace("-", "_")] = value
        if "pin_prompt" in items:
            items["pin_prompt"] = items["pin_prompt"] in ("1", "true", "yes")
        if "slot" in items:
            items["slot"] = int(items["slot"])
        if "chain_files" in items:
            items["chain_files"] = items["chain_files"].split(":")
        return cls.from_config(items, path="--signer")


class SekishoSigner:
    """One signing key with its certificate, whatever holds the key.

    Use as ``async with`` (or call :meth:`close`) so a PKCS#11 session is closed.
    """

    def __init__(
        self,
        signer: Signer,
        *,
        backend: str,
        chain: tuple[asn1_x509.Certificate, ...] = (),
        close: Callable[[], None] | None = None,
    ) -> None:
        cert = signer.signing_cert
        if cert is None:
            raise SigningError("signer has no certificate")
        self.pyhanko: Signer = signer
        self.certificate: asn1_x509.Certificate = cert
        self.chain = chain
        self.backend = backend
        self._close = close

    @property
    def key_algorithm(self) -> str:
        """``"rsa"`` or ``"ec"`` (from the certificate's public key)."""
        return str(self.certificate.public_key.algorithm)

    @property
    def subject(self) -> str:
        return self.certificate.subject.human_friendly

    async def sign_raw(self, data: bytes, digest_algorithm: str = "sha256") -> bytes:
        """Hash ``data`` and sign the digest: RSASSA-PKCS1-v1_5 (RFC 8017 §8.2,
        DigestInfo with the hash OID) or ECDSA (DER ``Ecdsa-Sig-Value``)."""
        try:
            return await self.pyhanko.async_sign_raw(data, digest_algorithm)
        except PyHankoSigningError as exc:
            raise SigningError(f"{self.backend} signer failed: {exc}") from exc
        except Exception as exc:  # python-pkcs11 raises its own hierarchy
            if type(exc).__module__.startswith("pkcs11"):
                raise SigningError(f"PKCS#11 token refused to sign: {exc!r}") from exc
            raise

    def close(self) -> None:
        if self._close is not None:
            self._close()
            self._close = None

    async def __aenter__(self) -> SekishoSigner:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


def _chain(spec: SignerSpec) -> tuple[asn1_x509.Certificate, ...]:
    return tuple(c for p in spec.chain_files for c in load_asn1_certificates(p))


class _LoadedKeySigner(SimpleSigner):
    """A file-key signer that parses its private key once and signs off the loop.

    pyHanko's ``SimpleSigner.sign_raw`` re-parses the DER private key for every
    signature (tens of milliseconds for RSA-2048, on the event loop).  This
    keeps the parsed key and runs the RSA/ECDSA operation in a worker thread;
    other mechanisms fall back to pyHanko.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._key = serialization.load_der_private_key(self.signing_key.dump(), password=None)

    def _sign_now(self, data: bytes, digest_algorithm: str) -> bytes:
        mechanism = self.get_signature_mechanism_for_digest(digest_algorithm)
        try:
            name = mechanism.signature_algo
        except ValueError:
            name = mechanism["algorithm"].native
        hash_algo = getattr(hashes, digest_algorithm.upper().replace("-", "_"))()
        if name == "rsassa_pkcs1v15" and isinstance(self._key, rsa.RSAPrivateKey):
            return self._key.sign(data, asym_padding.PKCS1v15(), hash_algo)
        if name == "ecdsa" and isinstance(self._key, ec.EllipticCurvePrivateKey):
            return self._key.sign(data, ec.ECDSA(hash_algo))
        return super().sign_raw(data, digest_algorithm)

    def sign_raw(self, data: bytes, digest_algorithm: str) -> bytes:
        return self._sign_now(data, digest_algorithm)

    async def async_sign_raw(
        self, data: bytes, digest_algorithm: str, dry_run: bool = False
    ) -> bytes:
        return await asyncio.to_thread(self._sign_now, data, digest_algorithm)


def _open_pkcs12(spec: SignerSpec) -> SekishoSigner:
    assert spec.pkcs12 is not None and spec.password_file is not None
    password = read_secret_file(spec.password_file)
    check_private_key_permissions(spec.pkcs12)
    chain = _chain(spec)
    try:
        data = spec.pkcs12.read_bytes()
        loaded = SimpleSigner.load_pkcs12_data(data, other_certs=list(chain), passphrase=password)
        signer = _LoadedKeySigner(
            signing_cert=loaded.signing_cert,
            signing_key=loaded.signing_key,
            cert_registry=loaded.cert_registry,
            signature_mechanism=loaded.signature_mechanism,
        )
    except OSError as exc:
        raise ConfigurationError(f"cannot read PKCS#12 file {spec.pkcs12}: {exc.strerror}") from exc
    except ValueError as exc:
        raise SigningError(
            f"cannot open PKCS#12 file {spec.pkcs12} (wrong password or damaged file)"
        ) from exc
    return SekishoSigner(signer, backend="pkcs12", chain=chain)


def _open_pkcs11(spec: SignerSpec, prompt: PinPrompt | None) -> SekishoSigner:
    import pkcs11
    from pyhanko.config.pkcs11 import TokenCriteria
    from pyhanko.sign.pkcs11 import PKCS11Signer, open_pkcs11_session

    if spec.pin_file is not None:
        pin = read_secret_file(spec.pin_file).decode("utf-8")
    else:
        ask = prompt or getpass.getpass
        pin = ask(f"PIN for token {spec.token_label or spec.slot or ''}: ")
    criteria = TokenCriteria(label=spec.token_label) if spec.token_label else None
    assert spec.module is not None
    try:
        session = open_pkcs11_session(
            spec.module, slot_no=spec.slot, token_criteria=criteria, user_pin=pin
        )
    except (pkcs11.PKCS11Error, PyHankoSigningError, OSError, RuntimeError) as exc:
        raise SigningError(f"cannot open PKCS#11 token: {exc!r}") from exc
    try:
        cert = None
        if spec.cert_file is not None:
            certs = load_asn1_certificates(spec.cert_file)
            cert = certs[0]
        chain = _chain(spec)
        signer = PKCS11Signer(
            session,
            cert_label=spec.cert_label,
            cert_id=spec.cert_id,
            signing_cert=cert,
            key_label=spec.key_label,
            key_id=spec.key_id,
            ca_chain=list(chain),
        )
        signer._load_objects()  # fetch cert and key handle now: fail early, clearly
    except (pkcs11.PKCS11Error, PyHankoSigningError) as exc:
        session.close()
        raise SigningError(f"PKCS#11 key or certificate not found on token: {exc}") from exc
    except BaseException:
        session.close()
        raise
    return SekishoSigner(signer, backend="pkcs11", chain=chain, close=session.close)


async def open_signer(spec: SignerSpec, *, pin_prompt: PinPrompt | None = None) -> SekishoSigner:
    """Open the signer described by ``spec`` (token I/O runs in a thread)."""
    if spec.kind == "pkcs12":
        return await asyncio.to_thread(_open_pkcs12, spec)
    return await asyncio.to_thread(_open_pkcs11, spec, pin_prompt)
