"""`python -m dsjax.serve certs DIR`: a cluster CA and a node certificate for mutual TLS.

    python -m dsjax.serve certs ./cluster-tls --host router.internal --host 10.0.0.7
    python -m dsjax.serve --workers processes --tls-dir ./cluster-tls

Writes into DIR (made if needed, mode 0700):

    ca.pem         the cluster CA's certificate (every node trusts it)
    ca-key.pem     the CA's private key (0600): it signs node certificates; no node needs it
    node.pem       a node certificate the CA signed, for TLS servers and clients alike
    node-key.pem   its private key (0600)

The node certificate names localhost, 127.0.0.1 and ::1, plus every `--host` (a DNS name or an
IP address): each address a node is dialled at (`--router`, `--advertise-host`) must be among
them, since clients check the server's name. Copy ca.pem, node.pem and node-key.pem to every host
of the cluster. Existing files are never overwritten unless `--force` is given. Keys are ECDSA
P-256; certificates are valid for `--days` (default 365).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from pathlib import Path

from serving.tls import CA_CERT, CA_KEY, NODE_CERT, NODE_KEY

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")


def _san(name: str):
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(name.strip("[]")))
    except ValueError:
        return x509.DNSName(name)


def _cert(subject: str, public_key, issuer: str, signing_key, *, days: int, ca: bool, hosts=()):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
         .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
         .public_key(public_key).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))
    if ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                                          encipher_only=False, decipher_only=False), critical=True)
    else:
        b = (b.add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, key_cert_sign=False, crl_sign=False,
                                           content_commitment=False, data_encipherment=False, key_agreement=False,
                                           encipher_only=False, decipher_only=False), critical=True)
             .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                            critical=False)
             .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key()), critical=False))
    return b.sign(signing_key, hashes.SHA256())


def make_certs(folder: str | os.PathLike, *, hosts=(), days: int = 365, force: bool = False,
               name: str = "dsjax") -> list[Path]:
    """Write the CA and a node certificate into `folder`; the paths written. FileExistsError (and
    nothing written) when any of the four files exists and not `force`."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder = Path(folder)
    paths = {n: folder / n for n in (CA_CERT, CA_KEY, NODE_CERT, NODE_KEY)}
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not force:
        raise FileExistsError(f"refusing to overwrite {', '.join(existing)} (--force replaces them; every node "
                              f"then needs the new files)")
    if days < 1:
        raise ValueError(f"days={days} must be >= 1")
    all_hosts = list(dict.fromkeys([*DEFAULT_HOSTS, *hosts]))  # in order, without repeats
    ca_key, node_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = f"{name} cluster CA"
    ca = _cert(ca_name, ca_key.public_key(), ca_name, ca_key, days=days, ca=True)
    node = _cert(f"{name} node", node_key.public_key(), ca_name, ca_key, days=days, ca=False, hosts=all_hosts)

    def key_pem(k) -> bytes:
        return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    contents = {CA_CERT: (ca.public_bytes(serialization.Encoding.PEM), 0o644), CA_KEY: (key_pem(ca_key), 0o600),
                NODE_CERT: (node.public_bytes(serialization.Encoding.PEM), 0o644), NODE_KEY: (key_pem(node_key), 0o600)}
    for fname, (data, mode) in contents.items():
        path = paths[fname]
        path.unlink(missing_ok=True)  # --force: a fresh file, created with its mode (no window at 0644)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(path, mode)  # whatever the umask
    return list(paths.values())


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m dsjax.serve certs",
                                description="Make a cluster CA and a node certificate for --tls-dir (mutual TLS).")
    p.add_argument("dir", help="folder to write ca.pem, ca-key.pem, node.pem, node-key.pem into")
    p.add_argument("--host", action="append", default=[],
                   help="another DNS name or IP address the node certificate is valid for (repeatable); "
                        f"always: {', '.join(DEFAULT_HOSTS)}")
    p.add_argument("--days", type=int, default=365, help="validity of both certificates")
    p.add_argument("--force", action="store_true", help="replace existing files")
    args = p.parse_args(argv)
    try:
        written = make_certs(args.dir, hosts=args.host, days=args.days, force=args.force)
    except (FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    names = ", ".join(dict.fromkeys([*DEFAULT_HOSTS, *args.host]))
    for path in written:
        print(f"wrote {path} ({oct(path.stat().st_mode & 0o777)[2:]})")
    print(f"node certificate valid for {names}, {args.days} days; serve with --tls-dir {args.dir} "
          f"(every node needs {CA_CERT}, {NODE_CERT}, {NODE_KEY}; keep {CA_KEY} off them)")
    return 0
