"""The gateway side of signing: configuration, CLI, auditing and audit sealing (R-SIG, R-AUD-2/5).

:mod:`signing` does the cryptography on plain values; this package is the
edge around it (STYLE "sans-IO core, thin edges"):

* :mod:`.config` -- the ``[signing]`` section as
  :class:`signing.cli.SigningSettings`, paths resolved against the file;
* :mod:`.events` -- the audit records of signing, verification, clock skew
  and sealing (PS3.15 A.5 vocabulary, no patient names);
* :mod:`.service` -- ``sekisho sign`` / ``sekisho verify`` with every outcome
  audited;
* :mod:`.sealing` -- RFC 3161 seals of the audit chain head, their checks,
  and the periodic sealing task of the serving process;
* :mod:`.devtsa` -- a loopback development TSA (``openssl ts -reply``);
* :mod:`.commands` -- the argparse wiring.
"""
