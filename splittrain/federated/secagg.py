"""Secure aggregation (:class:`SecureAverager`, over TCP) masks client updates pairwise (Bonawitz et al., 2017,
without their dropout recovery).

Scheme. Every client ``u`` holds a float vector ``x_u`` and a weight ``w_u`` (e.g. its sample count); the server
must learn ``sum_u w_u x_u / sum_u w_u`` and nothing about any single ``x_u``.

1. Key agreement: each client has an X25519 key pair; the server relays the public keys. Each pair ``(u, v)``
   derives the same 32-byte key ``k_uv`` = HKDF-SHA256(X25519(u, v), info=context naming both clients).
2. Encoding: ``w_u x_u`` is rounded to fixed point, ``round(w_u x_u * 2**scale_bits)``, as an int64 read as an
   element of Z/2**64 (two's complement).
3. Masking: for the round's nonce ``r``, ``m_uv`` = ChaCha20 keystream of ``k_uv`` under ``r``, as uint64 words.
   Client ``u`` sends ``y_u = enc_u + sum_{v > u} m_uv - sum_{v < u} m_uv (mod 2**64)`` (names compared as str).
4. The server adds the ``y_u`` modulo 2**64: every ``m_uv`` is added once (by the smaller name) and subtracted
   once (by the larger), so the total is ``sum_u enc_u`` exactly, which :func:`decode` turns back into the
   weighted average (signed int64, divided by ``2**scale_bits`` and by the total weight).

Each ``y_u`` on its own is uniform on Z/2**64 to anyone not holding a key ``k_uv`` of ``u`` (a one-time pad), so
the server sees only the sum. Precision: each client's rounding error is at most ``2**-(scale_bits + 1)`` on
``w_u x_u``, so the average is off by at most ``n * 2**-(scale_bits + 1) / sum(w)`` (plus float64 rounding).
Range: each ``|w_u x_u|`` must be below ``2**(62 - scale_bits)`` (checked by :func:`encode`) and the weighted
total below ``2**(63 - scale_bits)`` (``2**39`` at the default 24 bits; not checkable once masked).

Threat model and limits:

* Honest-but-curious server: it follows the protocol (relays the public keys unchanged, announces the true
  participant set, reports dropouts truthfully) but tries to learn individual updates from what it sees.
  Clients are honest and do not collude with the server. The weights ``w_u`` are not hidden.
* Masks cancel only if every client of the agreed participant set submits, all with the same nonce. If one
  drops, the total is garbage (:func:`decode` of it is noise); the round must be redone over the survivors with
  a fresh nonce (:meth:`Masker.protect` with ``participants=survivors``). The Bonawitz secret sharing that
  recovers a dropped client's masks without a redo is not implemented.
* A server that lies is outside this model and defeats it. A server that lies about the participant set of a
  2-client round (telling the victim its partner is a client the server plays or colludes with) learns the
  victim's update given its own: it is the total minus its own. A server that claims a client dropped after
  receiving its masked vector learns that client's update as the difference between the full round's total and
  the survivors' redo; one that tells a client it is the round's only participant gets its update unmasked (a
  lone client sends its update as the round's sum, so that a client rejoining at that step is served). A server
  that swaps public keys can derive every mask. Defending against these needs
  authenticated keys, a minimum participant count the clients check, and Bonawitz's double masking.
* The aggregate itself is revealed, so whoever knows all but one of the summed updates learns the last one; with
  two participants each learns the other's update. Differential privacy, if wanted, is a separate layer.
* A (key, nonce) pair must mask a single vector: two vectors masked with the same masks differ by the difference
  of their updates. :class:`Masker` refuses a nonce it has already used since its last :meth:`Masker.agree`.
  :class:`SecureAverager` numbers its averages by the federation's step, so a client that rejoins uses the
  members' nonces, with keys derived from its new key pair.
* A client that rejoins a run in progress brings a new key pair; the server relays its public key as it relayed
  the first ones (:meth:`Masker.admit`), with the same trust. What a rejoining client is sent besides is what the
  server already learns from the sums (:mod:`splittrain.federated.trunk`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .settings import FederatedSettings

SCALE_BITS = 24
CONTEXT = b"splittrain secagg v1"
KEY_BYTES = 32
_MAX_NONCE = 2**64


class KeyPair:
    """An X25519 key pair that derives one symmetric key per peer."""

    def __init__(self, private: X25519PrivateKey) -> None:
        self._private = private
        self.public: bytes = private.public_key().public_bytes_raw()

    @classmethod
    def generate(cls) -> KeyPair:
        """A fresh random key pair."""
        return cls(X25519PrivateKey.generate())

    def shared_key(self, peer_public: bytes, context: bytes) -> bytes:
        """32 bytes of HKDF-SHA256 over the X25519 secret shared with ``peer_public``, with ``info=context``.

        Both sides get the same key when they pass the same ``context`` (see :func:`pair_context`).
        """
        if not isinstance(peer_public, (bytes, bytearray)) or len(peer_public) != KEY_BYTES:
            got = len(peer_public) if isinstance(peer_public, (bytes, bytearray)) else type(peer_public).__name__
            raise ValueError(f"a peer public key is {KEY_BYTES} raw bytes, got {got}")
        secret = self._private.exchange(X25519PublicKey.from_public_bytes(bytes(peer_public)))
        return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=bytes(context)).derive(secret)


def pair_context(prefix: bytes, a: str, b: str) -> bytes:
    """The HKDF context of the pair ``{a, b}``: ``prefix`` + both names sorted, each length-prefixed (order-free)."""
    out = bytearray(prefix)
    for name in sorted((a, b)):
        raw = name.encode()
        if len(raw) >= 2**16:
            raise ValueError("a participant name is at most 65535 UTF-8 bytes")
        out += len(raw).to_bytes(2, "big") + raw
    return bytes(out)


def encode(values: torch.Tensor, weight: float, scale_bits: int = SCALE_BITS) -> torch.Tensor:
    """Flattened ``round(values * weight * 2**scale_bits)`` as int64 (computed in float64).

    Raises OverflowError if a weighted value is not finite or its magnitude reaches ``2**(62 - scale_bits)``.
    """
    if not values.is_floating_point():
        raise TypeError(f"encode takes a floating-point tensor, got {values.dtype}")
    if not 0 <= scale_bits < 62:
        raise ValueError(f"scale_bits must be in [0, 62), got {scale_bits}")
    x = values.detach().to("cpu", torch.float64).flatten() * float(weight)
    if not bool(torch.isfinite(x).all()):
        raise OverflowError("cannot encode non-finite values (inf or nan in values * weight)")
    limit = 2.0 ** (62 - scale_bits)
    if x.numel() and float(x.abs().max()) >= limit:
        raise OverflowError(f"|values * weight| reaches {float(x.abs().max()):.6g}; with scale_bits={scale_bits} "
                            f"it must stay below 2**{62 - scale_bits} = {limit:.6g}")
    return torch.round(x * 2.0**scale_bits).to(torch.int64)


def mask_stream(key: bytes, nonce: int, n: int) -> np.ndarray:
    """``n`` uint64 words of the ChaCha20 keystream of ``key`` (32 bytes), read little-endian.

    The 16-byte ChaCha20 nonce is an 8-byte little-endian block counter 0 then ``nonce`` as 8 bytes little-endian.
    """
    if len(key) != KEY_BYTES:
        raise ValueError(f"a mask key is {KEY_BYTES} bytes, got {len(key)}")
    if not 0 <= nonce < _MAX_NONCE:
        raise ValueError(f"nonce must be in [0, 2**64), got {nonce}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    iv = (0).to_bytes(8, "little") + int(nonce).to_bytes(8, "little")
    stream = Cipher(algorithms.ChaCha20(bytes(key), iv), mode=None).encryptor().update(bytes(8 * n))
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64)


def _as_words(t: torch.Tensor) -> np.ndarray:
    if t.dtype != torch.int64:
        raise TypeError(f"expected an int64 tensor, got {t.dtype}")
    return t.detach().cpu().contiguous().numpy().view(np.uint64).reshape(-1)


def mask(encoded: torch.Tensor, me: str, peers: Mapping[str, bytes], nonce: int) -> torch.Tensor:
    """``encoded`` plus the stream of each peer named after ``me``, minus that of each named before, mod 2**64.

    ``peers`` maps each other participant's name to the key shared with it; returns int64 of ``encoded``'s shape.
    """
    if me in peers:
        raise ValueError(f"{me!r} is among its own peers")
    words = _as_words(encoded).copy()
    for name, key in peers.items():
        stream = mask_stream(key, nonce, words.size)
        if name > me:
            words += stream
        else:
            words -= stream
    return torch.from_numpy(words.view(np.int64)).reshape(encoded.shape)


def aggregate(masked: Sequence[torch.Tensor]) -> torch.Tensor:
    """The sum of the masked int64 vectors modulo 2**64, as int64."""
    if not masked:
        raise ValueError("nothing to aggregate")
    shape = masked[0].shape
    total = np.zeros(masked[0].numel(), dtype=np.uint64)
    for t in masked:
        if t.shape != shape:
            raise ValueError(f"masked vectors differ in shape: {tuple(t.shape)} vs {tuple(shape)}")
        total += _as_words(t)
    return torch.from_numpy(total.view(np.int64)).reshape(shape)


def decode(total: torch.Tensor, total_weight: float, scale_bits: int = SCALE_BITS) -> torch.Tensor:
    """The float64 average: ``total`` (signed int64) ``/ 2**scale_bits / total_weight``."""
    if total.dtype != torch.int64:
        raise TypeError(f"decode takes an int64 tensor, got {total.dtype}")
    if not (math.isfinite(total_weight) and total_weight > 0):
        raise ValueError(f"total_weight must be finite and > 0, got {total_weight}")
    return total.to(torch.float64) / 2.0**scale_bits / total_weight


class Masker:
    """One client's side: its key pair, its name, and the keys it shares with the other participants."""

    def __init__(self, name: str, keypair: KeyPair | None = None) -> None:
        if not name:
            raise ValueError("a participant needs a non-empty name")
        self.name = name
        self.keypair = keypair if keypair is not None else KeyPair.generate()
        self._keys: dict[str, bytes] = {}
        self._publics: dict[str, bytes] = {}
        self._used_nonces: set[int] = set()

    @property
    def public(self) -> bytes:
        """The 32-byte X25519 public key to publish."""
        return self.keypair.public

    def agree(self, publics: Mapping[str, bytes], context_prefix: bytes = CONTEXT) -> None:
        """Derive the key shared with every other name in ``publics`` (which may list this client too).

        Replaces earlier keys and forgets used nonces. ``context_prefix`` should name the session, so that
        sessions with the same key pairs get different masks.
        """
        mine = publics.get(self.name)
        if mine is not None and bytes(mine) != self.public:
            raise ValueError(f"the roster lists a public key for {self.name!r} that is not this client's")
        self._keys = {other: self.keypair.shared_key(pub, pair_context(context_prefix, self.name, other))
                      for other, pub in publics.items() if other != self.name}
        self._publics = {other: bytes(pub) for other, pub in publics.items() if other != self.name}
        self._used_nonces = set()

    def admit(self, publics: Mapping[str, bytes], context_prefix: bytes = CONTEXT) -> None:
        """Derive keys with the peers of ``publics`` that are new or have a new public key (a client that rejoined);
        the other keys and the nonces used with them stay."""
        for other, pub in publics.items():
            if other != self.name and self._publics.get(other) != bytes(pub):
                self._keys[other] = self.keypair.shared_key(pub, pair_context(context_prefix, self.name, other))
                self._publics[other] = bytes(pub)

    def protect(self, values: torch.Tensor, weight: float, participants: Sequence[str], nonce: int,
                scale_bits: int = SCALE_BITS) -> torch.Tensor:
        """``mask(encode(values, weight), ...)`` over the keys of ``participants`` (this client included).

        ``participants`` is the round's full set; a round redone without dropped clients lists the survivors and
        a nonce not used before. Raises KeyError for a participant without an agreed key.
        """
        names = list(participants)
        if len(set(names)) != len(names):
            raise ValueError(f"participants lists a name twice: {names}")
        if self.name not in names:
            raise ValueError(f"{self.name!r} is not among the participants {names}")
        if len(names) < 2:
            raise ValueError("a round needs at least 2 participants, or nothing masks the update")
        missing = [p for p in names if p != self.name and p not in self._keys]
        if missing:
            raise KeyError(f"no agreed key with {missing}; call agree() with their public keys first")
        if nonce in self._used_nonces:
            raise ValueError(f"nonce {nonce} was already used with these keys; each round needs a fresh one")
        encoded = encode(values, weight, scale_bits)
        out = mask(encoded, self.name, {p: self._keys[p] for p in names if p != self.name}, nonce)
        self._used_nonces.add(nonce)
        return out


class SecureAverager:
    """Over TCP: the average goes through the trunk server with secure aggregation (pairwise masks, above).

    At the start every client publishes an X25519 public key and its weight through the server (``keys``) and
    derives a mask key with every other client. Each average is then one ``aggregate`` request carrying this
    client's update, fixed-point encoded with its weight and masked pairwise, so the server can only add the
    updates up. When a client dropped out, or one rejoined with a new key pair, the server answers with the round's
    participants (and the members' public keys) and the round is redone over them with a fresh nonce.

    Args:
        link: this client's link to the trunk server.
        index: this client's index.
        settings: the federation.
        samples: this client's training rows (its weight).
        share: FedSGD: the client-side state this client holds (header and tensors of a ``share`` request), sent
            when the server asks for it for a client that rejoins.
    """

    SCALE_BITS = 40
    """Fixed-point fraction bits: updates are scaled by weight / total weight, so |values| < 2**22 fit."""

    def __init__(self, link, index: int, settings: FederatedSettings, samples: int,
                 share: Callable[[int], tuple[dict[str, Any], dict[str, torch.Tensor]]] | None = None) -> None:
        self.link, self.index, self.settings, self.share = link, index, settings, share
        self.masker = Masker(self.name(index))
        header = self.link.request_plain("keys", {"public": self.masker.public.hex(),
                                                  "weight": settings.weight(True, samples)})
        self.context = b"splittrain secagg v1 " + str(header["federation"]).encode()
        self.masker.agree(self._publics(header), self.context)
        self.alive = sorted(int(i) for i in header["publics"])
        self.roster = int(header.get("roster", 0))
        self.scale = float(sum(header["weights"].values()))

    @staticmethod
    def name(index: int) -> str:
        return f"{index:06d}"  # sorts as the indices do

    def _publics(self, header: dict[str, Any]) -> dict[str, bytes]:
        return {self.name(int(i)): bytes.fromhex(h) for i, h in header["publics"].items()}

    def average(self, vectors: dict[int, torch.Tensor], weights: dict[int, float], tag: str, step: int
                ) -> torch.Tensor:
        """The weighted average of every client's vector; ``step``: the federation's optimizer step (0-based) it
        ends, which numbers the round's nonces alike on every client."""
        ((index, vector),) = vectors.items()
        for attempt in range(min(self.settings.clients + 2, 256)):  # a rejoin redoes a round once, a dropout too
            nonce = ((step + 1) << 8) | attempt
            if self.alive == [self.index]:
                # The only client left still asks the server: a client that rejoins at this step waits for its
                # state (``share``) and is admitted by a redone round. Its update is the round's sum, all that
                # secure aggregation reveals of a round, so it goes unmasked (one client has no pair to mask with).
                masked = encode(vector, weights[index] / self.scale, self.SCALE_BITS)
            else:
                masked = self.masker.protect(vector, weights[index] / self.scale, [self.name(i) for i in self.alive],
                                             nonce, self.SCALE_BITS)
            request = {"nonce": nonce, "weight": weights[index], "participants": self.alive, "roster": self.roster}
            header, tensors = self.link.request_tensors("aggregate", request, {"masked": masked})
            if "share" in header:  # a client rejoins at this step: send it the state first, then the update again
                if self.share is None:
                    raise RuntimeError(f"the trunk server asked client {self.index} for a state it does not share")
                fields, state = self.share(int(header["share"]))
                self.link.request_tensors("share", fields, state)
                header, tensors = self.link.request_tensors("aggregate", request, {"masked": masked})
            if "retry" in header:
                self.alive = sorted(header["retry"])
                self.masker.admit(self._publics(header), self.context)
                self.roster = int(header["roster"])
                continue
            return self.decoded(tensors["sum"], float(header["total_weight"])).to(vector.dtype)
        raise RuntimeError(f"secure aggregation of {tag} failed: clients kept dropping out")

    def decoded(self, total: torch.Tensor, total_weight: float) -> torch.Tensor:
        """The float64 average of a masked sum the server answered, of clients weighing ``total_weight``."""
        if total_weight <= 0:
            raise RuntimeError("no client took part in this average")
        return decode(total, total_weight / self.scale, self.SCALE_BITS)
