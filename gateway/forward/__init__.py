"""Store-and-forward to partners, PACS and the external storage provider (R-XCH-4..7, R-EXT).

* :mod:`.destinations` -- ``[destinations.NAME]``, ``[routing]``, ``[forward]`` and
  ``[retention]`` settings, and the transfer-syntax policy (R-XCH-6);
* :mod:`.queue` -- the durable job queue in the metadata database (one job per
  instance and destination, leases, backoff, Storage Commitment transactions);
* :mod:`.integrity` -- what exactly is sent: the stored file's hash re-checked,
  the dataset bytes' SHA-256 recorded when sent (R-XCH-5);
* :mod:`.dimse_send` -- C-STORE SCU over TLS and the Storage Commitment request
  (PS3.4 Annex B and J, PS3.7);
* :mod:`.commitment` -- N-EVENT-REPORT handling (``handle_n_event_report``),
  shared by the sending association and the DIMSE listener;
* :mod:`.stow_send` -- STOW-RS client with a client certificate (PS3.18 10.5);
* :mod:`.worker` -- asyncio workers, routing scan and maintenance;
* :mod:`.auditing` -- PS3.15 A.5.3.4 transfer records and stop alerts (R-XCH-7);
* :mod:`.retrieve` / :mod:`.restore` -- restore from a destination with hash
  verification (R-EXT-3);
* :mod:`.api` / :mod:`.commands` -- admin HTTP API and ``sekisho send|queue|restore``.
"""
