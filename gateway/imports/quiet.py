"""Keep pydicom from echoing patient data into operational logs (R-OPS-3; STYLE §12).

pydicom logs and warns about values it cannot parse, quoting them ("Invalid
value for VR PN: 'Yamada^...'").  Media brought by patients are hostile input:
those messages would copy names and IDs into logs that are not protected like
the audit trail.  Problems with a medium are reported through the import
report's findings instead, which never carry patient data.
"""

from __future__ import annotations

import logging
import warnings


def silence_pydicom() -> None:
    """Drop pydicom's log records and warnings (idempotent)."""
    logger = logging.getLogger("pydicom")
    logger.setLevel(logging.CRITICAL + 1)
    logger.propagate = False
    logger.handlers[:] = [logging.NullHandler()]
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
