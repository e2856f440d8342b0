"""Artifact signatures in the OpenSSF model-signing format, with elliptic-curve keys, fully offline.

A signature covers every file of the version folder (the manifest included) and lives beside them as
`model.sig`, a Sigstore bundle that the `model_signing` CLI verifies too. Verification fails on any
changed, missing or added file and on a signature made with another key.
"""

from __future__ import annotations

from pathlib import Path

from shipyard._extras import require
from shipyard.errors import IntegrityError, InvalidInputError, NotFoundError

SIGNATURE_FILE = "model.sig"


def _model_signing() -> tuple[object, object, object]:
    require("OpenSSL", "signing", "artifact signing")  # model_signing uses it without declaring it
    signing = require("model_signing.signing", "signing", "artifact signing")
    verifying = require("model_signing.verifying", "signing", "artifact signing")
    hashing = require("model_signing.hashing", "signing", "artifact signing")
    return signing, verifying, hashing


def _hashing_config(folder: Path) -> object:
    _, _, hashing = _model_signing()
    return hashing.Config().set_ignored_paths(paths=[folder / SIGNATURE_FILE])  # type: ignore[attr-defined]


def generate_keys(private_path: Path, public_path: Path) -> None:
    """An EC P-256 key pair as PEM files (the private one readable by its owner only)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    for path in (private_path, public_path):
        if path.exists():
            raise InvalidInputError(f"{path} exists: refusing to overwrite a key")
    key = ec.generate_private_key(ec.SECP256R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())  # fmt: skip
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    private_path.parent.mkdir(parents=True, exist_ok=True)
    private_path.touch(mode=0o600)
    private_path.write_bytes(private)
    public_path.write_bytes(public)


def sign(folder: Path, private_key: Path) -> Path:
    """Sign the version folder with `private_key` (PEM); returns the signature's path."""
    signing, _, _ = _model_signing()
    if not private_key.is_file():
        raise NotFoundError(f"private key not found: {private_key}")
    destination = folder / SIGNATURE_FILE
    try:
        config = signing.Config().use_elliptic_key_signer(private_key=private_key)  # type: ignore[attr-defined]
        config.set_hashing_config(_hashing_config(folder)).sign(folder, destination)
    except ValueError as exc:
        raise InvalidInputError(f"cannot sign with {private_key}: {exc}") from None
    return destination


def verify_signature(folder: Path, public_key: Path) -> None:
    """Check the folder's signature against `public_key`; IntegrityError if unsigned, tampered or foreign."""
    _, verifying, _ = _model_signing()
    signature = folder / SIGNATURE_FILE
    if not signature.is_file():
        raise IntegrityError(f"{folder.parent.name}:{folder.name} is not signed")
    try:
        config = verifying.Config().use_elliptic_key_verifier(public_key=public_key)  # type: ignore[attr-defined]
        config.set_hashing_config(_hashing_config(folder)).verify(folder, signature)
    except FileNotFoundError:
        raise NotFoundError(f"public key not found: {public_key}") from None
    except ValueError as exc:
        raise IntegrityError(f"{folder.parent.name}:{folder.name}: signature check failed: {exc}") from None
