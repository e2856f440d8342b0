"""Encryption at rest: model files sealed with AES-256-GCM when a key is configured.

The key comes from $SHIPYARD_ENCRYPTION_KEY (base64 of 32 bytes) or the file $SHIPYARD_ENCRYPTION_KEY_FILE
points to. `build` seals the model file before hashing, so the manifest's hashes (and signatures) cover
the stored ciphertext and `verify` needs no key; the server opens it in memory when the key is present.
Archives carry the sealed files as they are, so remote copies are encrypted too.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
from pathlib import Path

from shipyard.artifact.manifest import Manifest
from shipyard.errors import IntegrityError, InvalidInputError, UnavailableError

KEY_ENV = "SHIPYARD_ENCRYPTION_KEY"
KEY_FILE_ENV = "SHIPYARD_ENCRYPTION_KEY_FILE"
ALGORITHM = "AES-256-GCM"
_MAGIC = b"SHIPYARD-AESGCM1"
_NONCE = 12


def _decode(text: str, where: str) -> bytes:
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInputError(f"{where}: the encryption key must be base64") from None
    if len(key) != 32:
        raise InvalidInputError(f"{where}: the encryption key must be 32 bytes (AES-256), not {len(key)}")
    return key


def load_key() -> bytes | None:
    """The configured key, or None when encryption is not configured."""
    if os.environ.get(KEY_ENV):
        return _decode(os.environ[KEY_ENV], f"${KEY_ENV}")
    if os.environ.get(KEY_FILE_ENV):
        path = Path(os.environ[KEY_FILE_ENV])
        try:
            return _decode(path.read_text(), str(path))
        except FileNotFoundError:
            raise InvalidInputError(f"${KEY_FILE_ENV} names {path}, which does not exist") from None
    return None


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


def model_source(folder: Path, manifest: Manifest) -> str | bytes:
    """What ONNX Runtime should load: the model's path, or its decrypted bytes for a sealed artifact."""
    path = folder / manifest.model_file
    if manifest.encryption is None:
        return str(path)
    key = load_key()
    if key is None:
        raise UnavailableError(
            f"{manifest.name}:{manifest.version} is encrypted (key {manifest.encryption['key_id']}): "
            f"set ${KEY_ENV} or ${KEY_FILE_ENV}"
        )
    if key_id(key) != manifest.encryption["key_id"]:
        raise IntegrityError(
            f"{manifest.name}:{manifest.version} was encrypted with key {manifest.encryption['key_id']}, "
            f"not the configured {key_id(key)}"
        )
    return open_sealed(path, key)
