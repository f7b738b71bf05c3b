"""Content Credentials made on the spot, for the benchmark and the tests: a throwaway certificate chain
(a CA and its leaf, generated here, so nothing is fetched) and a C2PA-signed JPEG declaring a source type.

A real deployment never signs; it only reads (:mod:`aidetect_batch.media.provenance`). The chain is not on any
trust list, so a manifest it signs validates as "Valid", never "Trusted".
"""

from __future__ import annotations

import datetime
import functools
import io
from typing import Any

import c2pa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

IPTC_TYPES = "http://cv.iptc.org/newscodes/digitalsourcetype/"


def _name(common: str) -> Any:

    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "aidetect-batch tests"),
        ]
    )


def _certificate(subject: Any, issuer: Any, public: Any, signing_key: Any, *, ca: bool) -> Any:

    now = datetime.datetime.now(datetime.timezone.utc)
    usage = x509.KeyUsage(
        digital_signature=not ca, content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=False, key_cert_sign=ca, crl_sign=ca, encipher_only=False, decipher_only=False,
    )  # fmt: skip
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(usage, critical=True)
    )
    if not ca:
        authority = x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key())
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False
        ).add_extension(authority, critical=False)
    return builder.sign(signing_key, hashes.SHA256())


@functools.lru_cache(maxsize=1)
def _chain() -> tuple[bytes, bytes]:
    """PEM of the leaf and CA certificates, and the leaf's private key (made once per process)."""

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _certificate(_name("test CA"), _name("test CA"), ca_key.public_key(), ca_key, ca=True)
    leaf = _certificate(_name("test signer"), ca.subject, key.public_key(), ca_key, ca=False)
    chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (leaf, ca))
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return chain, pem


def sign_jpeg(jpeg: bytes, source_type: str, agent: str = "TestDiffusion 2.1") -> bytes:
    """``jpeg`` with an embedded C2PA manifest whose ``c2pa.created`` action declares ``source_type``."""
    return sign(jpeg, "image/jpeg", source_type, agent)


def sign(data: bytes, mime: str, source_type: str, agent: str = "TestDiffusion 2.1") -> bytes:
    """``data`` (a ``mime`` file c2pa can embed into: JPEG, PNG, MP4, MOV, ...) with an embedded C2PA manifest
    whose ``c2pa.created`` action declares ``source_type``, signed under a chain made here."""
    chain, key = _chain()
    signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(c2pa.C2paSigningAlg.ES256, chain, key, None))
    action = {"action": "c2pa.created", "digitalSourceType": IPTC_TYPES + source_type, "softwareAgent": {"name": agent}}
    manifest = {
        "claim_generator_info": [{"name": "aidetect-batch tests", "version": "1"}],
        "title": "generated." + mime.rsplit("/", 1)[-1],
        "assertions": [{"label": "c2pa.actions", "data": {"actions": [action]}}],
    }
    signed = io.BytesIO()
    with c2pa.Builder(manifest) as builder:
        builder.sign(signer, mime, io.BytesIO(data), signed)
    return signed.getvalue()
