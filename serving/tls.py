"""TLS for the cluster's internal gRPC (mutual) and for the public API (server-only).

The cluster: `python -m dsjax.serve certs DIR` (serving/certs.py) writes a cluster CA and one node
certificate it signed, valid as server and as client. Given `--tls-dir DIR` (or $DSJAX_TLS_DIR),
every internal listener (the router's Registry and Admin, every worker) requires a client
certificate signed by that CA, and every internal call presents the node certificate and checks
the peer's against the CA (and its name against the address dialled): a caller without the
cluster's certificate is refused during the TLS handshake, before any gRPC message is read. The
cluster token (serving/cluster_auth.py) still applies on top when set.

A node reads DIR/ca.pem, DIR/node.pem and DIR/node-key.pem; the CA's key (DIR/ca-key.pem) is not
needed to serve and should stay off the nodes.

The public API: `--api-tls-cert FILE --api-tls-key FILE` serve the public gRPC port (Generate,
health, reflection) and the OpenAI HTTP API over TLS with that certificate (no client
certificate asked); clients check it against its CA (`python -m dsjax.client --tls-ca FILE`).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import grpc

TLS_DIR_ENV = "DSJAX_TLS_DIR"
CA_CERT, CA_KEY, NODE_CERT, NODE_KEY = "ca.pem", "ca-key.pem", "node.pem", "node-key.pem"


@dataclasses.dataclass(frozen=True)
class ClusterTLS:
    """The cluster CA and this node's certificate and key (PEM bytes)."""

    ca: bytes
    cert: bytes
    key: bytes
    source: str = ""  # the folder they were read from (messages only)

    @classmethod
    def load(cls, tls_dir: str | os.PathLike) -> "ClusterTLS":
        """DIR/ca.pem, DIR/node.pem, DIR/node-key.pem; a ValueError names what is missing."""
        folder = Path(tls_dir)
        paths = [folder / name for name in (CA_CERT, NODE_CERT, NODE_KEY)]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise ValueError(f"--tls-dir {folder}: missing {', '.join(missing)} "
                             f"(make them with `python -m dsjax.serve certs {folder}`)")
        ca, cert, key = (p.read_bytes() for p in paths)
        for p, data in zip(paths, (ca, cert, key)):
            if b"-----BEGIN " not in data:
                raise ValueError(f"--tls-dir {folder}: {p} is not PEM")
        return cls(ca, cert, key, str(folder))

    def server_credentials(self) -> grpc.ServerCredentials:
        """Mutual TLS: the node certificate, and a client certificate signed by the CA required."""
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca, require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Present the node certificate; trust only servers the cluster CA signed."""
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert)


def cluster_tls(tls_dir: str | os.PathLike | None) -> ClusterTLS | None:
    """`--tls-dir`'s credentials (None: no TLS); a SystemExit says what is wrong."""
    if not tls_dir:
        return None
    try:
        return ClusterTLS.load(tls_dir)
    except (OSError, ValueError) as e:
        raise SystemExit(str(e)) from None


def api_server_credentials(cert_file: str | None, key_file: str | None) -> grpc.ServerCredentials | None:
    """The public port's server-only TLS (`--api-tls-cert`, `--api-tls-key`), or None without them."""
    if not cert_file and not key_file:
        return None
    if not (cert_file and key_file):
        raise SystemExit("--api-tls-cert and --api-tls-key go together (the public API's certificate and its key)")
    try:
        key, cert = Path(key_file).read_bytes(), Path(cert_file).read_bytes()
    except OSError as e:
        raise SystemExit(f"public API TLS: {e}") from None
    return grpc.ssl_server_credentials([(key, cert)])


def bind(server: grpc.Server, address: str, tls: ClusterTLS | None) -> int:
    """Bind an internal server's port: mutual TLS with `tls`, plaintext without; the port (0: failed)."""
    if tls is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, tls.server_credentials())


def dial(address: str, tls: ClusterTLS | None, options=None) -> grpc.Channel:
    """A channel to an internal server: mutual TLS with `tls`, plaintext without."""
    if tls is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, tls.channel_credentials(), options=options)
