"""Signed chunks for the shared tier: only a server holding the signing key can put KV there that another
server will import.

A value in the shared store is ``MAGIC | HMAC-SHA256(key, store_key | NUL | chunk) | chunk``, where
``chunk`` is the chunk file's bytes (:mod:`.chunk_file`) and ``store_key`` the key it is stored under. The
MAC covers the header (session key, token ids, layer CRCs) and every payload byte, so a value forged or
altered by anyone without the key (even with a victim's session key, its token ids and valid CRCs) fails
:meth:`ChunkSigner.open` and is never written or served.
Binding the store key means a genuine chunk moved under another key (another session, another index)
fails too.

Rotation: the first key signs, every key verifies, so servers can be given a new key first and the old
one removed once every server signs with the new one.
"""

from __future__ import annotations

import hashlib
import hmac

from strata.storage.chunk_file import ChunkError

MAGIC = b"STRATASG"
TAG_BYTES = 32
MIN_KEY_BYTES = 32  # 256 bits: as strong as the MAC


class ChunkSigner:
    def __init__(self, keys: list[bytes]) -> None:
        if not keys:
            raise ValueError("a signing key is needed")
        for key in keys:
            if len(key) < MIN_KEY_BYTES:
                raise ValueError(f"a signing key must have at least {MIN_KEY_BYTES} bytes, got {len(key)}")
        self._keys = list(keys)

    @property
    def overhead(self) -> int:
        """Bytes a sealed value adds to its chunk."""
        return len(MAGIC) + TAG_BYTES

    def _tag(self, key: bytes, store_key: str, chunk: bytes | memoryview) -> bytes:
        mac = hmac.new(key, store_key.encode() + b"\0", hashlib.sha256)
        mac.update(chunk)
        return mac.digest()

    def seal(self, store_key: str, chunk: bytes) -> bytes:
        return MAGIC + self._tag(self._keys[0], store_key, chunk) + chunk

    def open(self, store_key: str, value: bytes) -> memoryview:
        """The chunk inside a sealed value; ChunkError("signature") unless one of the keys signed it for
        ``store_key``."""
        view = memoryview(value)
        head = len(MAGIC) + TAG_BYTES
        if len(value) < head or view[: len(MAGIC)] != MAGIC:
            raise ChunkError("signature", "unsigned value")
        tag, chunk = bytes(view[len(MAGIC):head]), view[head:]
        if not any(hmac.compare_digest(tag, self._tag(key, store_key, chunk)) for key in self._keys):
            raise ChunkError("signature", "bad signature")
        return chunk


def parse_keys(text: str) -> list[bytes]:
    """Signing keys from a secret's text: one per line (the first signs), blank lines ignored."""
    return [line.strip().encode() for line in text.splitlines() if line.strip()]
