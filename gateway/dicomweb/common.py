"""Shared pieces of the DICOMweb handlers: permissions and their audit."""

from __future__ import annotations

from aiohttp import web

from gateway.audit import events as ev
from gateway.peers import Principal
from gateway.service import Gateway
from gateway.store.model import Permission
from pki.errors import AuthorizationError

_WORDS = {"push": "store studies", "query": "query", "retrieve": "retrieve studies"}


async def require(request: web.Request, principal: Principal, permission: Permission) -> None:
    """Refuse, with an audited Security Alert, what the partner may not do (R-XCH-3)."""
    if principal.partner.may(permission):
        return
    gw: Gateway = request.app["gateway"]
    await gw.record(
        ev.security_alert(
            "not-permitted",
            f"partner is not permitted to {_WORDS[permission]} ({request.method} {request.path})",
            actor=principal.name,
            actor_kind=principal.kind,  # type: ignore[arg-type]
            source_address=principal.address,
            cert_sha256=principal.cert_sha256,
            event_type=ev.USE_OF_RESTRICTED_FUNCTION,
        )
    )
    raise AuthorizationError(f"this partner is not permitted to {_WORDS[permission]}")
