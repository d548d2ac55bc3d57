"""The metrics API's TLS: given certificate files, or a self-signed one made at start-up.

The aggregator does not verify the operator's certificate (the APIService says
``insecureSkipTLSVerify``, as it cannot know a certificate made at start-up), but it
speaks only HTTPS: an operator without a certificate of its own still needs one. Made
in memory because the operator's root filesystem is read-only.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
import tempfile
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from shoal_operator.builders import apiservice as reg


def self_signed_pem(hosts: Sequence[str], days: int = 365) -> bytes:
    """A fresh key and a self-signed certificate for ``hosts``, as one PEM (cert first)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, reg.SERVICE_NAME)])
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def ssl_context(cert: str | None, key: str | None, hosts: Sequence[str]) -> ssl.SSLContext:
    """From the given files, or a self-signed certificate made now (the APIService skips
    verification: the aggregator cannot know a certificate made at start-up)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    if cert and key:
        ctx.load_cert_chain(cert, key)
        return ctx
    pem = self_signed_pem(hosts)
    # ssl loads certificates from files only, and the operator's root filesystem is
    # read-only: an anonymous in-memory file does (Linux), a temporary file elsewhere.
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("shoal-metrics-api.pem")
        try:
            os.write(fd, pem)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return ctx
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tls.pem"
        path.write_bytes(pem)
        ctx.load_cert_chain(str(path))
    return ctx
