"""Film and paper digitization as legal records (R-DIG-1..5) and signature renewal (R-SIG-6).

* :mod:`~gateway.digitization.settings` - ``[digitization]`` and ``[renewal]``;
* :mod:`~gateway.digitization.deadline` - business-day deadline (R-DIG-3), pure;
* :mod:`~gateway.digitization.records` - film receipts, bulk plans,
  digitization records and signed records in the metadata database;
* :mod:`~gateway.digitization.workflow` - quality gate, SC/PDF building,
  signing without delay, verification and atomic storage (R-DIG-4);
* :mod:`~gateway.digitization.renewal` - the renewal job (R-SIG-6);
* :mod:`~gateway.digitization.commands` - ``sekisho film|digitize|signatures``;
* :mod:`~gateway.digitization.api` - ``/staff/...`` HTTP API.

Nothing is imported here so that loading the settings stays cheap.
"""
