"""DICOM (DIMSE) over mutual TLS: the partners' C-STORE, C-FIND, C-MOVE and C-GET (R-XCH-1).

* :mod:`.listener` -- the TLS acceptor: raw accept, handshake with a deadline in
  the connection's own thread, per-address limits, certificate authentication
  and the A-ASSOCIATE-RQ gate on the calling AE title (R-TLS-4/5/6; PS3.15 B.1);
* :mod:`.session` -- what one association knows: the partner, its transfers
  for the audit trail, and the routing of retrieve requests;
* :mod:`.storage` -- C-STORE ingest streamed to the content store, hashed on
  the way (PS3.4 Annex B; PS3.7 9.1.1; PS3.10 file format);
* :mod:`.qr` -- Query/Retrieve identifiers mapped onto the consent-filtered
  store (PS3.4 Annex C);
* :mod:`.retrieve` -- C-GET and C-MOVE sub-operations that send the stored
  bytes as received, never transcoded (PS3.4 C.4.2/C.4.3; R-XCH-6);
* :mod:`.scp` -- :class:`DimseService`, the composition of the above that
  ``gateway.server`` starts and stops.
"""

from gateway.dimse.scp import DimseService

__all__ = ["DimseService"]
