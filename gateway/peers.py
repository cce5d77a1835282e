"""Who is at the other end: from a validated certificate to a partner (R-TLS-3/4).

``decide_partner`` and ``decide_association`` are pure; ``PeerAuthenticator``
wires the certificate validator and the partner registry together.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from gateway.store.model import Partner, Visibility
from pki.errors import PeerAuthenticationError
from pki.peer import PeerCertificateValidator, ValidatedCertificate


@dataclass(frozen=True)
class Principal:
    """An authenticated peer, as every handler sees it."""

    name: str
    kind: str  # "partner" | "provider"
    cert_sha256: str
    address: str | None
    partner: Partner

    @property
    def visibility(self) -> Visibility:
        return Visibility(partner=self.partner.name, networks=self.partner.networks)


def decide_partner(
    cert: ValidatedCertificate, partner: Partner | None, address: str | None
) -> Principal:
    """Bind a validated certificate to a registered partner, or refuse."""
    if partner is None:
        raise PeerAuthenticationError(
            "the client certificate is valid but not registered to any partner",
            reason="unregistered",
        )
    if not partner.address_allowed(address):
        raise PeerAuthenticationError(
            f"connections for partner {partner.name!r} are not allowed from this address",
            reason="address-not-allowed",
        )
    return Principal(
        name=partner.name,
        kind="provider" if partner.role == "external-storage" else "partner",
        cert_sha256=cert.sha256,
        address=address,
        partner=partner,
    )


def decide_association(principal: Principal, calling_ae: str, called_ae: str, own_ae: str) -> None:
    """DIMSE association check (R-TLS-4): the calling AE must belong to the certificate."""
    if called_ae.strip() != own_ae:
        raise PeerAuthenticationError(
            f"called AE title {called_ae.strip()!r} is not this gateway", reason="wrong-called-ae"
        )
    if calling_ae.strip() not in principal.partner.ae_titles:
        raise PeerAuthenticationError(
            f"calling AE title {calling_ae.strip()!r} is not registered for this certificate",
            reason="wrong-ae-title",
        )


class PeerAuthenticator:
    def __init__(self, validator: PeerCertificateValidator, store: object) -> None:
        self.validator = validator
        self.store = store

    async def authenticate(self, der: bytes | None, address: str | None) -> Principal:
        if not der:
            raise PeerAuthenticationError(
                "the client did not present a certificate", reason="no-certificate"
            )
        cert = await self.validator.validate(der)
        partner = await asyncio.get_running_loop().run_in_executor(
            None,
            self.store.partner_for_certificate,  # type: ignore[attr-defined]
            cert.sha256,
            cert.issuer,
            cert.subject,
        )
        return decide_partner(cert, partner, address)
