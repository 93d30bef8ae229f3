"""Certificates and keys of a deployment, made with the ``cryptography`` library.

``colora deploy keys DIR --clients N`` writes a certificate authority (``ca.crt``, ``ca.key``), the
server's TLS certificate for the given hosts (``server.pem``, ``server.key``) and one ECDSA P-384
key pair per data owner (``client_K`` in OpenSSH format, ``client_K.pub``): Flower's SuperNode
authentication signs with the private key, and the server registers the public ones, so only those
owners join. Each owner gets ``ca.crt`` and its own ``client_K``; ``ca.key`` never leaves the
operator. Private keys are written readable by their owner only.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ..config import ColoraError

VALID_DAYS = 365


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)


def make_credentials(out: Path, clients: int, hosts: list[str]) -> list[Path]:
    """Write the deployment's CA, server certificate (SANs: ``hosts``, 127.0.0.1 and localhost) and
    ``clients`` owner key pairs."""
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    pem, none = serialization.Encoding.PEM, serialization.NoEncryption()
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (x509.CertificateBuilder().subject_name(_name("colora deployment CA")).issuer_name(_name("colora deployment CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number()).not_valid_before(now)
          .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True).sign(ca_key, hashes.SHA384()))
    sans = []
    hosts = list(dict.fromkeys([*hosts, "127.0.0.1", "localhost"]))  # the server's own tools connect over loopback
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca.subject).public_key(server_key.public_key())
              .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
              .add_extension(x509.SubjectAlternativeName(sans), critical=False).sign(ca_key, hashes.SHA384()))
    _write(out / "ca.crt", ca.public_bytes(pem))
    _write(out / "ca.key", ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, none), private=True)
    _write(out / "server.pem", server.public_bytes(pem))
    _write(out / "server.key", server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, none), private=True)
    written = [out / "ca.crt", out / "server.pem"]
    for k in range(clients):
        key = ec.generate_private_key(ec.SECP384R1())
        _write(out / f"client_{k}", key.private_bytes(pem, serialization.PrivateFormat.OpenSSH, none), private=True)
        _write(out / f"client_{k}.pub", key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
        written.append(out / f"client_{k}.pub")
    return written


def _load_certificate(path: Path, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except FileNotFoundError:
        raise ColoraError(f"{what} {path}: no such file; make the credentials with colora deploy keys") from None
    except ValueError as exc:
        raise ColoraError(f"{what} {path}: not a PEM certificate ({exc}); make the credentials with colora deploy keys") from None


def check_server_credentials(ca: Path, cert: Path, key: Path) -> None:
    """The server's certificate exists, parses, is signed by ``ca`` and matches its private key."""
    authority, certificate = _load_certificate(ca, "CA certificate"), _load_certificate(cert, "server certificate")
    try:
        certificate.verify_directly_issued_by(authority)
    except (ValueError, TypeError, Exception) as exc:  # InvalidSignature has no message
        raise ColoraError(f"server certificate {cert} is not signed by CA {ca} ({type(exc).__name__}); use the files of one colora deploy keys") from None
    try:
        private = serialization.load_pem_private_key(Path(key).read_bytes(), password=None)
    except (FileNotFoundError, ValueError, UnsupportedAlgorithm) as exc:
        raise ColoraError(f"server key {key}: missing or not a PEM private key ({exc})") from None
    if private.public_key().public_numbers() != certificate.public_key().public_numbers():
        raise ColoraError(f"server key {key} does not belong to certificate {cert}; use the files of one colora deploy keys")
    if certificate.not_valid_after_utc < datetime.datetime.now(datetime.timezone.utc):
        raise ColoraError(f"server certificate {cert} expired on {certificate.not_valid_after_utc:%Y-%m-%d}; make new credentials")


def check_client_credentials(ca: Path, key: Path) -> None:
    """An owner's CA certificate parses and its private key is an OpenSSH EC key."""
    _load_certificate(ca, "CA certificate")
    load_owner_key(key)


def check_public_key(path: Path) -> None:
    """A registered owner key is an OpenSSH EC public key."""
    try:
        key = serialization.load_ssh_public_key(Path(path).read_bytes())
    except (FileNotFoundError, ValueError, UnsupportedAlgorithm) as exc:
        raise ColoraError(f"owner public key {path}: missing or not an OpenSSH public key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ColoraError(f"owner public key {path}: not an elliptic-curve key")


def _join_payload(nonce: str, fingerprint: str, client: int) -> bytes:
    return f"colora-join|{nonce}|{fingerprint}|{client}".encode()


def load_owner_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """An owner's private key (OpenSSH format, as colora deploy keys writes it); a one-line error
    when it is missing or not an elliptic-curve key."""
    try:
        key = serialization.load_ssh_private_key(Path(path).read_bytes(), password=None)
    except FileNotFoundError:
        raise ColoraError(f"owner key {path}: no such file; the operator's colora deploy keys wrote client_K for each owner") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ColoraError(f"owner key {path}: not an OpenSSH private key ({exc}); use the client_K file of colora deploy keys") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ColoraError(f"owner key {path}: not an elliptic-curve key (Flower's node authentication needs one, e.g. P-384)")
    return key


def sign_join(key: ec.EllipticCurvePrivateKey, nonce: str, fingerprint: str, client: int) -> str:
    """An owner's answer to the server's join challenge: ECDSA over (nonce, config fingerprint, client id)."""
    return key.sign(_join_payload(nonce, fingerprint, client), ec.ECDSA(hashes.SHA384())).hex()


def verify_join(public_key: ec.EllipticCurvePublicKey, signature: str, nonce: str, fingerprint: str, client: int) -> bool:
    """Whether ``signature`` answers the challenge with the private key of ``public_key``."""
    try:
        public_key.verify(bytes.fromhex(signature), _join_payload(nonce, fingerprint, client), ec.ECDSA(hashes.SHA384()))
        return True
    except (InvalidSignature, ValueError):
        return False


def owner_public_keys(paths: list[Path]) -> list[ec.EllipticCurvePublicKey]:
    """The registered owners' public keys by client id: ``client_K.pub`` is client K's (as colora
    deploy keys names them); other names count in the order given."""
    for p in paths:
        check_public_key(p)
    ids = [re.fullmatch(r"client_(\d+)\.pub", Path(p).name) for p in paths]
    if all(ids):
        by_id = {int(m.group(1)): p for m, p in zip(ids, paths)}
        if sorted(by_id) != list(range(len(paths))):
            raise ColoraError(f"--owner-keys: clients {sorted(by_id)} given; give client_0.pub .. client_{len(paths) - 1}.pub, one per client")
        paths = [by_id[k] for k in range(len(paths))]
    return [serialization.load_ssh_public_key(Path(p).read_bytes()) for p in paths]
