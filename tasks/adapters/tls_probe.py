"""Which certificate a service presents right now: a TLS handshake, the peer's certificate read.

PostgreSQL (before 17) speaks TLS only after its SSLRequest; etcd and Patroni's REST API speak it
from the first byte and ask for a client certificate. The handshake verifies the server against
the cluster's CA: a service that presents anything else fails here, which is the point.
"""

from __future__ import annotations

import hashlib
import socket
import ssl
import struct

from tasks.adapters.client_tls import ClientTls
from tasks.errors import BouwsteenError

_SSL_REQUEST = struct.pack("!ii", 8, 80877103)


class TlsProbeFailed(BouwsteenError):
    """No TLS handshake with the service, or its certificate did not verify."""


def presented_fingerprint(address: str, port: int, tls: ClientTls, *, postgres: bool = False,
                          timeout: float = 5.0) -> str:
    """sha256 (hex) of the DER certificate the service at address:port presents."""
    context = ssl.create_default_context(cafile=tls.rootcert)
    if tls.cert and tls.key:
        context.load_cert_chain(tls.cert, tls.key)
    try:
        with socket.create_connection((address, port), timeout=timeout) as raw:
            if postgres:
                raw.sendall(_SSL_REQUEST)
                answer = raw.recv(1)
                if answer != b"S":
                    raise TlsProbeFailed(f"{address}:{port}: PostgreSQL refused TLS (answered {answer!r})")
            with context.wrap_socket(raw, server_hostname=address) as wrapped:
                der = wrapped.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError) as exc:
        raise TlsProbeFailed(f"{address}:{port}: TLS handshake failed: {exc}") from None
    if not der:
        raise TlsProbeFailed(f"{address}:{port}: presented no certificate")
    return hashlib.sha256(der).hexdigest()
