"""Sekisho media package: patient-brought media (IHE PDI) to reconciled DICOM.

A pure library (it never imports ``gateway``); the gateway does persistence,
audit and the CLI/HTTP around it.  Typical use::

    with open_source(path, settings) as source:          # media.source
        report = inspect_media(source, settings)          # media.inspect
        plan = plan_import(report, Selection.parse(sel))  # media.selection
        result = run_import(source, plan, local_patient, operator,
                            settings.station, settings, scanner, sink)  # media.importer

Modules: ``source`` (folder / ISO 9660, read-only, R-PDI-8), ``dicomdir`` and
``conformance`` (PS3.10 DICOMDIR and findings, R-PDI-1/2), ``dicomfile``
(per-file structure and header), ``report``/``hierarchy`` (what staff see),
``selection`` (R-PDI-3), ``reconcile`` (IHE IRWF, R-PDI-4/5), ``splice``
(writes reconciled files by copying untouched elements byte for byte) with
``rewrite`` (the pydicom fallback), ``scanner`` (ClamAV INSTREAM, R-PDI-2),
``importer``/``import_result`` (the import), ``digitize``/``paper``/
``secondary_capture`` (film and paper digitization, R-DIG), ``settings``
(typed configuration).
"""
