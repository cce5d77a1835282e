"""A throwaway Orthanc on loopback, behind nginx with mutual TLS.

Orthanc (Debian package, with its DICOMweb plugin) is the reference peer for
DICOMweb and DIMSE interoperability tests and the yardstick of
``bench/stow_throughput.py``.  Orthanc's own HTTPS crashes in Debian's build,
so HTTPS with client certificates is done by nginx (``ssl_verify_client on``)
in front of Orthanc's plain-HTTP port, which listens on loopback only
(``RemoteAccessAllowed: false``).  DICOM TLS (Orthanc >= 1.9) is Orthanc's own
and can be switched on with :class:`DicomTlsOptions`.

Everything lives in a temporary directory (configuration, storage, logs, nginx
state) that :meth:`OrthancPeer.stop` removes; both processes are stopped by
their own pids::

    with OrthancPeer(OrthancOptions(https=HttpsFront.from_devpki(pki))) as peer:
        peer.https_url + peer.dicomweb_root   # STOW-RS/QIDO-RS/WADO-RS over mTLS
        peer.http_url                          # Orthanc's REST API, plain HTTP
        peer.dicom_port, peer.aet              # DIMSE (TLS if dicom_tls is set)
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from pki.tls import TLS12_CIPHERS
from tests.peers import LOOPBACK, ManagedProcess, PeerStartError, free_port, tcp_open, wait_until

ORTHANC_BINARY = Path("/usr/sbin/Orthanc")
NGINX_BINARY = Path("/usr/sbin/nginx")
#: Where Debian's orthanc-dicomweb puts the plugin (``dpkg -L orthanc-dicomweb``).
DICOMWEB_PLUGIN_CANDIDATES = (
    Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so"),
    Path("/usr/lib/orthanc/libOrthancDicomWeb.so"),
)
DICOMWEB_ROOT = "/dicom-web"


def dicomweb_plugin() -> Path | None:
    for candidate in DICOMWEB_PLUGIN_CANDIDATES:
        if candidate.is_file():
            return candidate
    lib = Path("/usr/lib/orthanc")
    found = sorted(lib.glob("libOrthancDicomWeb.so*")) if lib.is_dir() else []
    return found[0] if found else None


def missing_tools() -> list[str]:
    """What is missing to run this peer (empty when everything is installed)."""
    missing = [str(p) for p in (ORTHANC_BINARY, NGINX_BINARY) if not p.exists()]
    if dicomweb_plugin() is None:
        missing.append("orthanc-dicomweb plugin")
    return missing


def orthanc_version() -> tuple[int, ...]:
    out = subprocess.run(
        [str(ORTHANC_BINARY), "--version"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    # First line: "<argv[0]> 1.10.1".
    words = out.splitlines()[0].split() if out else []
    text = words[1] if len(words) > 1 else "0"
    return tuple(int(p) for p in text.split(".") if p.isdigit())


@dataclass(frozen=True)
class DicomTlsOptions:
    """Orthanc's DICOM TLS (``DicomTls*`` keys, new in Orthanc 1.9.0)."""

    certificate: Path
    private_key: Path
    #: CA certificates Orthanc trusts for DICOM TLS peers (bundled into one PEM).
    trusted_certificates: tuple[Path, ...]
    remote_certificate_required: bool = True

    @classmethod
    def from_devpki(cls, pki: Any, *, role: str = "gateway-server") -> DicomTlsOptions:
        """Orthanc presents ``role``'s certificate and trusts the partners' CAs."""
        return cls(
            certificate=pki.cert_path(role),
            private_key=pki.key_path(role),
            trusted_certificates=(pki.cert_path("root-ca"), pki.cert_path("intermediate-ca")),
        )


@dataclass(frozen=True)
class HttpsFront:
    """nginx's side of mutual TLS in front of Orthanc's HTTP port."""

    #: PEM files presented by nginx: the leaf first, then its intermediates.
    certificate_chain: tuple[Path, ...]
    private_key: Path
    #: CA certificates trusted for client certificates (anchors and intermediates).
    client_cas: tuple[Path, ...]
    #: CRLs checked for every certificate of the client's chain (nginx ``ssl_crl``).
    crls: tuple[Path, ...] = ()

    @classmethod
    def from_devpki(cls, pki: Any, *, server_role: str = "gateway-server") -> HttpsFront:
        """The development PKI's server certificate; partners' CAs and CRLs trusted."""
        return cls(
            certificate_chain=(pki.chain_path(server_role),),
            private_key=pki.key_path(server_role),
            client_cas=(pki.cert_path("root-ca"), pki.cert_path("intermediate-ca")),
            crls=(pki.crl_path("root-ca"), pki.crl_path("intermediate-ca")),
        )


@dataclass(frozen=True)
class OrthancOptions:
    aet: str = "ORTHANC"
    #: nginx with ``ssl_verify_client on`` in front of the HTTP port; None: no HTTPS.
    https: HttpsFront | None = None
    dicom_tls: DicomTlsOptions | None = None
    #: Orthanc ``DicomModalities`` (name -> {"AET", "Host", "Port", "UseDicomTls", ...}).
    modalities: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: Merged into the generated Orthanc configuration last (top-level keys).
    extra_config: Mapping[str, Any] = field(default_factory=dict)
    nginx_workers: int = 1
    startup_timeout: float = 60.0
    #: Keep the temporary directory after stop() (to read the logs).
    keep_workdir: bool = False


class OrthancPeer:
    """Start with :meth:`start` (or ``with``), stop with :meth:`stop`."""

    def __init__(self, options: OrthancOptions | None = None) -> None:
        self.options = options or OrthancOptions()
        self.aet = self.options.aet
        self.workdir: Path | None = None
        self.http_port = 0
        self.dicom_port = 0
        self.https_port = 0
        self.orthanc: ManagedProcess | None = None
        self.nginx: ManagedProcess | None = None

    # -- addresses -----------------------------------------------------------
    @property
    def http_url(self) -> str:
        """Orthanc's own REST API (plain HTTP on loopback, no authentication)."""
        return f"http://{LOOPBACK}:{self.http_port}"

    @property
    def https_url(self) -> str:
        """nginx, mutual TLS; the DICOMweb root is ``https_url + dicomweb_root``."""
        if not self.https_port:
            raise RuntimeError("this Orthanc peer was started without an HTTPS front")
        return f"https://{LOOPBACK}:{self.https_port}"

    dicomweb_root = DICOMWEB_ROOT

    @property
    def storage_dir(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "storage"

    @property
    def orthanc_pid(self) -> int:
        assert self.orthanc is not None
        return self.orthanc.pid

    @property
    def nginx_pid(self) -> int | None:
        return self.nginx.pid if self.nginx else None

    # -- life cycle ----------------------------------------------------------
    def __enter__(self) -> OrthancPeer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> OrthancPeer:
        missing = missing_tools()
        if missing:
            raise PeerStartError(f"cannot start Orthanc: missing {', '.join(missing)}")
        self.workdir = Path(tempfile.mkdtemp(prefix="sekisho-orthanc-"))
        try:
            self._start_orthanc()
            if self.options.https is not None:
                self._start_nginx(self.options.https)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop nginx then Orthanc (each by its pid) and remove the workdir."""
        try:
            if self.nginx is not None:
                self.nginx.stop()
        finally:
            try:
                if self.orthanc is not None:
                    self.orthanc.stop(timeout=30)
            finally:
                if self.workdir is not None and not self.options.keep_workdir:
                    shutil.rmtree(self.workdir, ignore_errors=True)

    # -- Orthanc -------------------------------------------------------------
    def orthanc_config(self) -> dict[str, Any]:
        assert self.workdir is not None
        opts = self.options
        plugin = dicomweb_plugin()
        config: dict[str, Any] = {
            "Name": f"sekisho-test-{opts.aet}",
            "StorageDirectory": str(self.storage_dir),
            "IndexDirectory": str(self.storage_dir),
            "StorageCompression": False,
            "Plugins": [str(plugin)],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            # Only loopback clients (nginx, the tests) may use the plain-HTTP port.
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "SslEnabled": False,
            "WebDavEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": opts.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomModalities": {k: dict(v) for k, v in opts.modalities.items()},
            "SaveJobs": False,
            "DeidentifyLogs": True,
            "DicomWeb": {
                "Enable": True,
                "Root": DICOMWEB_ROOT + "/",
                "EnableWado": True,
                "Ssl": opts.https is not None,
                "Host": f"{LOOPBACK}:{self.https_port or self.http_port}",
            },
        }
        tls = opts.dicom_tls
        if tls is not None:
            config.update(
                {
                    "DicomTlsEnabled": True,
                    "DicomTlsCertificate": str(tls.certificate),
                    "DicomTlsPrivateKey": str(tls.private_key),
                    "DicomTlsTrustedCertificates": str(
                        _bundle(self.workdir / "dicom-tls-trusted.pem", tls.trusted_certificates)
                    ),
                    "DicomTlsRemoteCertificateRequired": tls.remote_certificate_required,
                }
            )
        config.update(opts.extra_config)
        return config

    def _start_orthanc(self) -> None:
        assert self.workdir is not None
        self.http_port = free_port()
        self.dicom_port = free_port()
        if self.options.https is not None:
            self.https_port = free_port()
        self.storage_dir.mkdir(mode=0o700)
        config_path = self.workdir / "orthanc.json"
        config_path.write_text(json.dumps(self.orthanc_config(), indent=2))
        self.orthanc = ManagedProcess(
            "Orthanc",
            [ORTHANC_BINARY, config_path],
            self.workdir / "orthanc.log",
            cwd=self.workdir,
            # Debian's DCMTK, which Orthanc's DICOM side uses, leaves Nagle's
            # algorithm on unless this is exported (then ~20 instances/s).
            env={**os.environ, "TCP_NODELAY": "1"},
        )
        if not wait_until(self._orthanc_ready, self.options.startup_timeout, 0.2):
            raise self.orthanc.fail("did not answer on its HTTP port")
        plugins = self.rest("GET", "/plugins")
        if "dicom-web" not in plugins:
            raise self.orthanc.fail(f"started without its DICOMweb plugin (plugins: {plugins})")

    def _orthanc_ready(self) -> bool:
        assert self.orthanc is not None
        if not self.orthanc.alive():
            raise self.orthanc.fail("exited during start-up")
        try:
            self.rest("GET", "/system", timeout=2)
            return True
        except (OSError, urllib.error.URLError):
            return False

    def rest(self, method: str, path: str, body: Any = None, timeout: float = 30) -> Any:
        """Call Orthanc's REST API over plain HTTP on loopback; return the JSON."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.http_url + path, data=data, method=method)
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - loopback
            raw = resp.read()
        return json.loads(raw) if raw else None

    def statistics(self) -> dict[str, Any]:
        """Orthanc's ``/statistics`` (CountInstances, TotalDiskSizeMB, ...)."""
        return dict(self.rest("GET", "/statistics"))

    # -- nginx ---------------------------------------------------------------
    def nginx_config(self, front: HttpsFront) -> str:
        assert self.workdir is not None
        wd = self.workdir
        tmp = wd / "nginx-tmp"
        chain = _bundle(wd / "nginx-server-chain.pem", front.certificate_chain)
        cas = _bundle(wd / "nginx-client-cas.pem", front.client_cas)
        crl_line = ""
        if front.crls:
            crl_line = f"ssl_crl {_bundle(wd / 'nginx-crls.pem', front.crls)};"
        return f"""\
# Generated by tests/peers/orthanc.py: mutual TLS in front of a test Orthanc.
daemon off;
master_process on;
worker_processes {self.options.nginx_workers};
pid {wd}/nginx.pid;
error_log {wd}/nginx-error.log warn;
{_user_directive()}
events {{ worker_connections 512; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream orthanc {{
        server {LOOPBACK}:{self.http_port};
        keepalive 32;
    }}
    server {{
        listen {LOOPBACK}:{self.https_port} ssl;
        ssl_certificate {chain};
        ssl_certificate_key {front.private_key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_ciphers {TLS12_CIPHERS};
        ssl_prefer_server_ciphers on;
        ssl_session_tickets off;
        ssl_client_certificate {cas};
        ssl_verify_client on;
        ssl_verify_depth 3;
        {crl_line}
        client_max_body_size 0;
        # Stream request and response bodies instead of spooling them to disk.
        proxy_request_buffering off;
        proxy_buffering off;
        proxy_read_timeout 600s;
        proxy_send_timeout 600s;
        location / {{
            proxy_pass http://orthanc;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host:$server_port;
            proxy_set_header X-Forwarded-Proto https;
        }}
    }}
}}
"""

    def _start_nginx(self, front: HttpsFront) -> None:
        assert self.workdir is not None
        (self.workdir / "nginx-tmp").mkdir(mode=0o700)
        conf = self.workdir / "nginx.conf"
        conf.write_text(self.nginx_config(front))
        error_log = self.workdir / "nginx-error.log"
        argv = [str(a) for a in (NGINX_BINARY, "-p", self.workdir, "-c", conf, "-e", error_log)]
        check = subprocess.run(
            [*argv, "-t"], capture_output=True, text=True, timeout=30, check=False
        )
        if check.returncode != 0:
            raise PeerStartError(f"nginx refused its generated configuration:\n{check.stderr}")
        self.nginx = ManagedProcess("nginx", argv, self.workdir / "nginx.log", cwd=self.workdir)

        def ready() -> bool:
            assert self.nginx is not None
            if not self.nginx.alive():
                raise self.nginx.fail("exited during start-up")
            return tcp_open(self.https_port)

        if not wait_until(ready, self.options.startup_timeout):
            raise self.nginx.fail("did not listen on its HTTPS port")


def _bundle(target: Path, parts: Sequence[Path]) -> Path:
    target.write_bytes(b"".join(Path(p).read_bytes().rstrip(b"\n") + b"\n" for p in parts))
    return target


def _user_directive() -> str:
    """Workers run as the current user, so they can use the 0700 temp directory."""
    if os.geteuid() != 0:
        return ""  # nginx ignores ``user`` when not started as root
    user = pwd.getpwuid(os.geteuid()).pw_name
    group = grp.getgrgid(os.getegid()).gr_name
    return f"user {user} {group};"
