"""Importing patient-brought media into the gateway (R-PDI-1..8, IHE RAD TF PDI / IRWF.b).

The pure reading, checking and reconciling happens in :mod:`media`; this
package is the edge around it that does the I/O the library must not do:

* :mod:`.config` -- the ``[media]`` configuration section (caps, scanner,
  finalization, staff console) and the factories for the library's values;
* :mod:`.records` -- the import record table (R-PDI-5/6): who, when, which
  medium, reconciliation, selection, hashes, findings, scanner verdict,
  status and the ``supersedes`` link; finalized records are immutable;
* :mod:`.finalization` -- 確定: on save by the importer, or at a configured
  time by a designated responsible person (R-PDI-6, 000 付録1);
* :mod:`.sink` -- the :class:`media.import_result.InstanceSink` over the
  gateway's content store and metadata database;
* :mod:`.service` -- one import from start to audit: inspect, plan, scan,
  reconcile, store, record, audit (R-AUD-3) and queue for the PACS (R-PDI-7);
* :mod:`.commands` -- ``sekisho media inspect|import|imports|finalize-due``;
* :mod:`.console` -- the staff console HTTP API on its own mutual-TLS listener
  that only registered staff certificates may use.

Nothing here is imported by :mod:`gateway.settings` except :mod:`.config`,
which imports no other part of the gateway.
"""
