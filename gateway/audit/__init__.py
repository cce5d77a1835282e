"""Sekisho's tamper-evident audit trail (R-AUD-1..4, R-TLS-5).

* :mod:`.events` -- DICOM PS3.15 A.5 vocabulary and :class:`AuditEvent`;
* :mod:`.chain` -- canonical encoding, record hashes and the streaming verifier;
* :mod:`.trail` -- :class:`AuditTrail`, the append-only SQLite store with its
  head checkpoint and RFC 3161 seals;
* :mod:`.reports` -- per-patient access history and access counts;
* :mod:`.dicom_xml` -- PS3.15 A.5.1 ``AuditMessage`` XML export;
* :mod:`.syslog` -- RFC 5424 / RFC 5425 forwarding to an IHE ATNA repository.
"""

from .chain import GENESIS_HASH, AuditRecord, VerifyReport
from .dicom_xml import audit_message, audit_message_bytes, export_dicom_xml
from .events import (
    Action,
    AuditEvent,
    Code,
    Outcome,
    application_activity,
    import_event,
    instances_transferred,
    query,
    security_alert,
)
from .reports import PatientAccessCount, access_counts, patient_accesses
from .syslog import SyslogTlsForwarder
from .trail import AuditTrail, Seal

__all__ = [
    "GENESIS_HASH",
    "Action",
    "AuditEvent",
    "AuditRecord",
    "AuditTrail",
    "Code",
    "Outcome",
    "PatientAccessCount",
    "Seal",
    "SyslogTlsForwarder",
    "VerifyReport",
    "access_counts",
    "application_activity",
    "audit_message",
    "audit_message_bytes",
    "export_dicom_xml",
    "import_event",
    "instances_transferred",
    "patient_accesses",
    "query",
    "security_alert",
]
