"""The controller's own TLS files for libpq: the cluster's CA bundle and, per role, the client
pair the flows log in with (libpq reads them from files, never from memory).

Kept in `$BOUWSTEEN_HOME/tls/<cluster>/`, a 0700 folder of 0600 files, rewritten only when their
content changes (a new issuing period or generation): every task of every run reuses them.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bouwsteen.home import bouwsteen_home
from tasks.adapters import pki


@dataclass(frozen=True)
class ClientTls:
    rootcert: str
    cert: str | None = None
    key: str | None = None

    def libpq(self) -> dict[str, str]:
        params = {"sslmode": "verify-full", "sslrootcert": self.rootcert}
        if self.cert and self.key:
            params.update(sslcert=self.cert, sslkey=self.key)
        return params


def _write_private(path: Path, text: str) -> None:
    try:
        if path.read_text() == text and (path.stat().st_mode & 0o777) == 0o600:
            return
    except OSError:
        pass
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as fh:  # mkstemp: 0600 from the start
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def controller_tls_files(inv, ca: pki.ClusterCA, role: str | None) -> ClientTls:
    directory = bouwsteen_home() / "tls" / inv.cluster.name
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(directory, 0o700)
    rootcert = directory / "ca.crt"
    _write_private(rootcert, ca.trust_bundle_pem)
    if role is None:
        return ClientTls(rootcert=str(rootcert))
    issued = pki.client_pair(inv, ca, role)
    cert, key = directory / f"{role}.crt", directory / f"{role}.key"
    _write_private(key, issued.private_key_pem)
    _write_private(cert, issued.certificate_pem)
    return ClientTls(rootcert=str(rootcert), cert=str(cert), key=str(key))
