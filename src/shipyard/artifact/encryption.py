"""Encryption at rest: model files sealed with AES-256-GCM when a key is configured.

The key (32 bytes) is read by the settings layer (shipyard.settings) and passed in. `build` seals the model
file, and its weight file when the weights live beside the graph (models over 2 GB), before hashing, so
the manifest's hashes (and signatures) cover the stored ciphertext and `verify` needs no key; the server
opens them in memory when the key is present (ONNX Runtime reads the weight file from memory: no plaintext
is written to disk). Files are sealed in chunks, each with its own tag bound to its place and to whether it
is the last, so a multi-GB file is never read whole and a truncated or reordered one is refused.
Archives carry the sealed files as they are, so remote copies are encrypted too.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
from pathlib import Path
from typing import NamedTuple

from shipyard.artifact.manifest import Manifest
from shipyard.errors import IntegrityError, InvalidInputError, UnavailableError

ALGORITHM = "AES-256-GCM"
_MAGIC_WHOLE = b"SHIPYARD-AESGCM1"  # older artifacts: one tag over the whole file (still opened)
_MAGIC = b"SHIPYARD-AESGCM2"  # chunked: one tag per chunk
_NONCE = 12
_PREFIX = 8  # the random part of each chunk's nonce; the other 4 bytes count the chunks
_TAG = 16
CHUNK = 4 << 20  # plaintext bytes per chunk: a multi-GB weight file is never read whole


class ModelSource(NamedTuple):
    """What ONNX Runtime loads: the graph (a path, or its decrypted bytes) and, for a sealed model with
    external weights, their decrypted side file by name (held in memory only, never written to disk)."""

    model: str | bytes
    side_files: dict[str, bytearray]


def key_id(key: bytes) -> str:
    """A public name for the key (recorded in manifests), from which the key cannot be recovered."""
    return hashlib.sha256(b"shipyard-key-id" + key).hexdigest()[:16]


def generate_key(path: Path) -> None:
    if path.exists():
        raise InvalidInputError(f"{path} exists: refusing to overwrite a key")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(base64.b64encode(secrets.token_bytes(32)).decode() + "\n")


def _aad(path: Path, index: int, final: bool) -> bytes:
    """What each chunk's tag also covers: the file's name, the chunk's place, and whether it is the last, so a
    chunk moved, swapped or cut off is refused."""
    return path.name.encode() + index.to_bytes(8, "big") + (b"\x01" if final else b"\x00")


def seal(path: Path, key: bytes) -> None:
    """Replace the file with its encryption, chunk by chunk (AES-256-GCM, a tag per chunk)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aead, prefix = AESGCM(key), secrets.token_bytes(_PREFIX)
    sealing = path.with_name(f"{path.name}.sealing")
    with path.open("rb") as plain, sealing.open("wb") as out:
        out.write(_MAGIC + prefix + CHUNK.to_bytes(4, "big"))
        chunk, index = plain.read(CHUNK), 0
        while True:
            following = plain.read(CHUNK)
            final = not following
            nonce = prefix + index.to_bytes(4, "big")
            out.write(aead.encrypt(nonce, chunk, _aad(path, index, final)))
            if final:
                break
            chunk, index = following, index + 1
    os.replace(sealing, path)


def open_sealed(path: Path, key: bytes) -> bytearray:
    """The decrypted file, in memory; IntegrityError for a wrong key or a modified, truncated or reordered file."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aead = AESGCM(key)
    with path.open("rb") as sealed:
        magic = sealed.read(len(_MAGIC))
        try:
            if magic == _MAGIC_WHOLE:
                nonce = sealed.read(_NONCE)
                return bytearray(aead.decrypt(nonce, sealed.read(), path.name.encode()))
            if magic != _MAGIC:
                raise IntegrityError(f"{path}: not an encrypted shipyard file")
            prefix, chunk = sealed.read(_PREFIX), int.from_bytes(sealed.read(4), "big")
            body = path.stat().st_size - len(_MAGIC) - _PREFIX - 4
            chunks = max(1, -(-body // (chunk + _TAG)))
            plain = bytearray(max(0, body - chunks * _TAG))
            at = 0
            for index in range(chunks):
                part = sealed.read(chunk + _TAG)
                nonce = prefix + index.to_bytes(4, "big")
                opened = aead.decrypt(nonce, part, _aad(path, index, index == chunks - 1))
                plain[at : at + len(opened)] = opened
                at += len(opened)
            return plain
        except (InvalidTag, ValueError):  # ValueError: a piece too short to hold its tag
            raise IntegrityError(
                f"{path}: cannot decrypt: wrong key, or a modified, truncated or reordered file"
            ) from None


def model_source(folder: Path, manifest: Manifest, key: bytes | None) -> ModelSource:
    """What ONNX Runtime should load: the model's path, or for a sealed artifact its decrypted graph and
    weight file in memory."""
    path = folder / manifest.model_file
    if manifest.encryption is None:
        return ModelSource(str(path), {})
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
    side = manifest.encryption.get("side_file")
    side_files = {side: open_sealed(folder / side, key)} if side else {}
    return ModelSource(bytes(open_sealed(path, key)), side_files)
