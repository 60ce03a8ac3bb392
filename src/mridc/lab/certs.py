"""A throwaway PKI for tests: one CA, a server certificate for loopback, client certificates.

Uses the ``openssl`` command line (present on Debian and Raspberry Pi OS), EC P-256 keys, so no
Python crypto package is needed. Never use these files outside tests.

>>> pki = generate_test_pki(tmp_path, clients=["cam-01"])
>>> pki.ca_cert, pki.server_cert, pki.server_key, pki.client_cert("cam-01"), pki.client_key("cam-01")
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path


class CertError(RuntimeError):
    """openssl is missing or failed."""


@dataclass(frozen=True)
class TestPki:
    __test__ = False  # not a pytest test class

    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    clients: dict[str, tuple[Path, Path]] = field(default_factory=dict)

    def client_cert(self, name: str) -> Path:
        return self.clients[name][0]

    def client_key(self, name: str) -> Path:
        return self.clients[name][1]


def _openssl(*args: str, cwd: Path) -> None:
    tool = shutil.which("openssl")
    if tool is None:
        raise CertError("openssl not found: install the Debian package 'openssl'")
    proc = subprocess.run([tool, *args], check=False, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CertError(f"openssl {' '.join(args[:2])} failed:\n{proc.stderr.strip()}")


def _key(path: Path, cwd: Path) -> None:
    # genpkey writes PKCS#8, which gRPC and mosquitto both read.
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path), cwd=cwd)
    path.chmod(0o600)


def _signed_cert(directory: Path, name: str, common_name: str, extensions: str, days: int) -> tuple[Path, Path]:
    key, csr, cert, ext = (directory / f"{name}{s}" for s in (".key", ".csr", ".crt", ".ext"))
    _key(key, directory)
    _openssl("req", "-new", "-key", str(key), "-subj", f"/CN={common_name}", "-out", str(csr), cwd=directory)
    ext.write_text(extensions)
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-days", str(days), "-sha256", "-extfile", str(ext), "-out", str(cert), cwd=directory,
    )
    csr.unlink()
    ext.unlink()
    return cert, key


def generate_test_pki(
    directory: str | os.PathLike,
    *,
    server_names: tuple[str, ...] = ("localhost",),
    server_ips: tuple[str, ...] = ("127.0.0.1",),
    clients: list[str] | tuple[str, ...] = (),
    days: int = 2,
) -> TestPki:
    """Create ``ca.crt``/``ca.key``, ``server.crt``/``server.key`` and ``<client>.crt``/``.key`` in ``directory``.

    A client certificate's common name is the client name (mosquitto's ``use_identity_as_username``
    then makes it the MQTT user name, e.g. the device id).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _key(directory / "ca.key", directory)
    _openssl(
        "req", "-x509", "-new", "-key", "ca.key", "-sha256", "-days", str(days), "-subj", "/CN=mridc-test-ca",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-out", "ca.crt", cwd=directory,
    )
    alt_names = ",".join([f"DNS:{n}" for n in server_names] + [f"IP:{ip}" for ip in server_ips])
    server_cert, server_key = _signed_cert(
        directory, "server", server_names[0] if server_names else server_ips[0],
        f"basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
        f"extendedKeyUsage=serverAuth\nsubjectAltName={alt_names}\n",
        days,
    )
    client_files = {
        name: _signed_cert(
            directory, name, name,
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n", days,
        )
        for name in clients
    }
    return TestPki(directory, directory / "ca.crt", directory / "ca.key", server_cert, server_key, client_files)
