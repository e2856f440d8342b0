"""Encryption at rest: model files sealed with AES-256-GCM when a key is configured.

The key (32 bytes) is read by the settings layer (shipyard.settings) and passed in. `build` seals the model
file before hashing, so the manifest's hashes (and signatures) cover
the stored ciphertext and `verify` needs no key; the server opens it in memory when the key is present.
Archives carry the sealed files as they are, so remote copies are encrypted too.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from pathlib import Path

from shipyard.artifact.manifest import Manifest
from shipyard.errors import IntegrityError, InvalidInputError, UnavailableError

ALGORITHM = "AES-256-GCM"
_MAGIC = b"SHIPYARD-AESGCM1"
_NONCE = 12


def key_id(key: bytes) -> str:
    """A public name for the key (recorded in manifests), from which the key cannot be recovered."""
    return hashlib.sha256(b"shipyard-key-id" + key).hexdigest()[:16]


def generate_key(path: Path) -> None:
    if path.exists():
        raise InvalidInputError(f"{path} exists: refusing to overwrite a key")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(base64.b64encode(secrets.token_bytes(32)).decode() + "\n")


def seal(path: Path, key: bytes) -> None:
    """Replace the file with its encryption (the file name is authenticated with it)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = secrets.token_bytes(_NONCE)
    sealed = AESGCM(key).encrypt(nonce, path.read_bytes(), path.name.encode())
    path.write_bytes(_MAGIC + nonce + sealed)


def open_sealed(path: Path, key: bytes) -> bytes:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    data = path.read_bytes()
    if not data.startswith(_MAGIC):
        raise IntegrityError(f"{path}: not an encrypted shipyard file")
    nonce, sealed = data[len(_MAGIC) : len(_MAGIC) + _NONCE], data[len(_MAGIC) + _NONCE :]
    try:
        return AESGCM(key).decrypt(nonce, sealed, path.name.encode())
    except InvalidTag:
        raise IntegrityError(f"{path}: cannot decrypt: wrong key or modified file") from None


def model_source(folder: Path, manifest: Manifest, key: bytes | None) -> str | bytes:
    """What ONNX Runtime should load: the model's path, or its decrypted bytes for a sealed artifact."""
    path = folder / manifest.model_file
    if manifest.encryption is None:
        return str(path)
    if key is None:
        raise UnavailableError(
            f"{manifest.name}:{manifest.version} is encrypted (key {manifest.encryption['key_id']}): "
            "set $SHIPYARD_ENCRYPTION_KEY or $SHIPYARD_ENCRYPTION_KEY_FILE"
        )
    if key_id(key) != manifest.encryption["key_id"]:
        raise IntegrityError(
            f"{manifest.name}:{manifest.version} was encrypted with key {manifest.encryption['key_id']}, "
            f"not the configured {key_id(key)}"
        )
    return open_sealed(path, key)
