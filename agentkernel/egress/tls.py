"""Opt-in TLS interception for secret substitution (``--tls-intercept``), with a CA per sandbox.

Only for hosts a secret is bound to, and only for connections through the proxy (CONNECT): the gateway
answers the sandbox's TLS with a certificate for that host signed by the sandbox's own CA, reads the
HTTP request, substitutes the secret, and sends it on over a new, verified TLS connection to the real
host. Every other TLS connection passes through untouched.

The CA: an ECDSA P-256 key made for one sandbox, valid one day, with X.509 name constraints limiting
it to the bound hosts, so even a leaked CA cannot vouch for any other name. The sandbox gets only its
certificate (bind-mounted at ``/.ak/egress-ca.pem``, plus a bundle ``/.ak/egress-ca-bundle.pem`` with
the host's public CAs appended, named by ``SSL_CERT_FILE``, ``REQUESTS_CA_BUNDLE``, ``CURL_CA_BUNDLE``
and ``NODE_EXTRA_CA_CERTS``); the key stays in the gateway's 0600 registration and dies with the
sandbox. Needs the ``cryptography`` package (extra ``egress-tls``).
"""

from __future__ import annotations

import datetime
import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

CA_IN = "/.ak/egress-ca.pem"
BUNDLE_IN = "/.ak/egress-ca-bundle.pem"
HOST_BUNDLES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem")


def _crypto():
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        from ..errors import BackendUnavailable

        raise BackendUnavailable("--tls-intercept needs the cryptography package",
                                 hint="pip install 'agentkernel[egress-tls]'") from None
    return x509, hashes, serialization, ec, NameOID


def make_ca(sandbox_id: str, hosts: list[str]) -> tuple[str, str]:
    """(certificate PEM, private key PEM) of a CA for one sandbox, constrained to ``hosts``."""
    x509, hashes, serialization, ec, NameOID = _crypto()
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"agentkernel sandbox {sandbox_id} egress CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.NameConstraints(permitted_subtrees=[x509.DNSName(h) for h in hosts],
                                            excluded_subtrees=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return (cert.public_bytes(serialization.Encoding.PEM).decode(),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()).decode())


def write_ca_files(directory: str, ca_pem: str) -> tuple[str, str]:
    """The CA alone and a bundle (host's public CAs + ours), world-readable (public certificates)."""
    os.makedirs(directory, mode=0o755, exist_ok=True)
    ca, bundle = os.path.join(directory, "ca.pem"), os.path.join(directory, "bundle.pem")
    host = ""
    for path in HOST_BUNDLES:
        try:
            with open(path) as f:
                host = f.read()
            break
        except OSError:
            continue
    for path, text in ((ca, ca_pem), (bundle, host.rstrip("\n") + "\n" + ca_pem if host else ca_pem)):
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, 0o644)
    return ca, bundle


def env() -> dict[str, str]:
    return {"SSL_CERT_FILE": BUNDLE_IN, "REQUESTS_CA_BUNDLE": BUNDLE_IN, "CURL_CA_BUNDLE": BUNDLE_IN,
            "NODE_EXTRA_CA_CERTS": CA_IN}


class LeafCache:
    """Server contexts for intercepted hosts, one leaf certificate per (sandbox, host), made on demand."""

    def __init__(self) -> None:
        self.cache: dict[tuple[str, str], Any] = {}

    def context(self, sandbox_id: str, ca_pem: str, key_pem: str, host: str):
        import ssl
        import tempfile

        k = (sandbox_id, host)
        if k in self.cache:
            return self.cache[k]
        x509, hashes, serialization, ec, NameOID = _crypto()
        ca = x509.load_pem_x509_certificate(ca_pem.encode())
        ca_key = serialization.load_pem_private_key(key_pem.encode(), None)
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        # load_cert_chain wants files: write them to a private temp dir, load, remove
        with tempfile.TemporaryDirectory() as d:
            cf, kf = os.path.join(d, "c.pem"), os.path.join(d, "k.pem")
            with open(cf, "wb") as f:
                f.write(cert.public_bytes(serialization.Encoding.PEM))
            fd = os.open(kf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
            os.close(fd)
            ctx.load_cert_chain(cf, kf)
        self.cache[k] = ctx
        return ctx

    def forget(self, sandbox_id: str) -> None:
        for k in [k for k in self.cache if k[0] == sandbox_id]:
            del self.cache[k]
