"""Secure aggregation by pairwise masking: exact cancellation, hiding, key agreement, dropouts, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from splittrain.federated import (
    CONTEXT,
    SCALE_BITS,
    KeyPair,
    Masker,
    aggregate,
    decode,
    encode,
    mask,
    mask_stream,
    pair_context,
)

N = 10_000


def _updates(n_clients: int, seed: int = 0) -> list[torch.Tensor]:
    """float32 vectors mixing large (~1e4), unit and tiny (~1e-9, below the fixed-point step) values, both signs."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_clients):
        x = torch.randn(N, generator=g)
        x[: N // 4] *= 1e4
        x[N // 4: N // 2] *= 1e-9
        out.append(x.to(torch.float32))
    return out


def _roster(names: list[str]) -> dict[str, Masker]:
    maskers = {name: Masker(name) for name in names}
    publics = {name: m.public for name, m in maskers.items()}
    for m in maskers.values():
        m.agree(publics, CONTEXT + b" test-session")
    return maskers


def _weighted_mean(xs: list[torch.Tensor], ws: list[float]) -> torch.Tensor:
    return sum(w * x.double() for x, w in zip(xs, ws)) / sum(ws)


def _bound(n_clients: int, total_weight: float, scale_bits: int) -> float:
    """Fixed point rounds each client's weighted value by at most half a step."""
    return n_clients * 2.0 ** -(scale_bits + 1) / total_weight


@pytest.mark.parametrize("weights", [[10.0, 30.0, 5.0], [10.0, 30.0, 5.0, 1.0, 2.5]])
def test_aggregate_is_weighted_average(weights):
    names = [f"client{i}" for i in range(len(weights))][::-1]  # roster order differs from sort order
    maskers = _roster(names)
    xs = _updates(len(weights))
    masked = [maskers[n].protect(x, w, names, nonce=1) for n, x, w in zip(names, xs, weights)]
    got = decode(aggregate(masked), sum(weights))
    want = _weighted_mean(xs, weights)
    assert got.dtype == torch.float64 and got.shape == (N,)
    err = (got - want).abs()
    bound = _bound(len(weights), sum(weights), SCALE_BITS)
    assert float(err.max()) <= 1e-6
    assert float(err.max()) <= bound + 1e-15 * float(want.abs().max())
    # Large values keep their relative precision; tiny ones (below the 2**-24 step) keep only the absolute bound.
    assert torch.allclose(got[: N // 4], want[: N // 4], rtol=1e-10, atol=bound)
    tiny = got[N // 4: N // 2]
    assert float((tiny - want[N // 4: N // 2]).abs().max()) <= bound and float((tiny == 0).double().mean()) > 0.3


def test_error_bound_matches_fixed_point():
    """At a coarse scale the rounding error is visible and reaches close to, but never beyond, the bound."""
    weights, scale_bits = [10.0, 30.0, 5.0], 8
    names = ["a", "b", "c"]
    maskers = _roster(names)
    xs = _updates(3, seed=1)
    masked = [maskers[n].protect(x, w, names, nonce=3, scale_bits=scale_bits) for n, x, w in zip(names, xs, weights)]
    got = decode(aggregate(masked), sum(weights), scale_bits=scale_bits)
    # Unmasked fixed-point sum gives the very same total: masking adds no error at all.
    plain = decode(sum(encode(x, w, scale_bits) for x, w in zip(xs, weights)), sum(weights), scale_bits)
    assert torch.equal(got, plain)
    want = _weighted_mean(xs, weights)
    err = float((got - want).abs().max())
    bound = _bound(3, sum(weights), scale_bits)
    assert 0.5 * bound < err <= bound + 1e-15 * float(want.abs().max())  # slack: float64 rounding of the reference


def test_masked_vectors_hide_updates():
    weights = [10.0, 30.0, 5.0]
    names = ["alice", "bob", "carol"]
    maskers = _roster(names)
    xs = _updates(3, seed=2)
    for n, x, w in zip(names, xs, weights):
        y = maskers[n].protect(x, w, names, nonce=5)
        enc = encode(x, w)
        assert y.dtype == torch.int64 and y.shape == enc.shape
        assert int((y != enc).sum()) == N  # a collision has probability 2**-64 per element
        r = np.corrcoef(y.double().numpy(), enc.double().numpy())[0, 1]
        assert abs(r) < 0.1
        alone = decode(y, w)
        assert not torch.allclose(alone, x.double(), atol=1.0)
        assert float((alone - x.double()).abs().median()) > 1e6  # noise on the scale of 2**63 / 2**24


def test_two_sided_mask_cancels():
    a, b = KeyPair.generate(), KeyPair.generate()
    ctx = pair_context(CONTEXT, "a", "b")
    k = a.shared_key(b.public, ctx)
    x = encode(torch.tensor([1.5, -2.25, 0.0]), 1.0)
    ya = mask(x, "a", {"b": k}, nonce=0)
    yb = mask(torch.zeros_like(x), "b", {"a": k}, nonce=0)
    assert not torch.equal(ya, x)
    assert torch.equal(aggregate([ya, yb]), x)
    assert decode(aggregate([ya, yb]), 1.0).tolist() == [1.5, -2.25, 0.0]


def test_key_agreement():
    a, b, c = KeyPair.generate(), KeyPair.generate(), KeyPair.generate()
    assert len(a.public) == 32 and isinstance(a.public, bytes)
    ctx = pair_context(CONTEXT, "a", "b")
    assert ctx == pair_context(CONTEXT, "b", "a")
    k_ab = a.shared_key(b.public, ctx)
    assert len(k_ab) == 32
    assert k_ab == b.shared_key(a.public, ctx)
    assert k_ab != a.shared_key(b.public, pair_context(b"another session", "a", "b"))
    assert k_ab != a.shared_key(c.public, ctx)
    # Length-prefixed names: ("ab", "c") and ("a", "bc") do not collide.
    assert pair_context(CONTEXT, "ab", "c") != pair_context(CONTEXT, "a", "bc")


def test_mask_stream():
    k1, k2 = bytes(range(32)), bytes(range(1, 33))
    s = mask_stream(k1, 7, 1000)
    assert s.dtype == np.uint64 and s.shape == (1000,)
    assert np.array_equal(s, mask_stream(k1, 7, 1000))  # deterministic
    assert np.array_equal(mask_stream(k1, 7, 10), s[:10])  # a prefix of the same stream
    assert np.count_nonzero(s == mask_stream(k1, 8, 1000)) == 0
    assert np.count_nonzero(s == mask_stream(k2, 7, 1000)) == 0
    assert mask_stream(k1, 7, 0).shape == (0,)
    # Words spread over the whole 64-bit range (top bit set about half the time).
    assert 400 < np.count_nonzero(s >= np.uint64(2**63)) < 600


def test_dropout_needs_redo_over_survivors():
    names = ["c0", "c1", "c2", "c3"]
    weights = dict(c0=10.0, c1=30.0, c2=5.0, c3=20.0)
    maskers = _roster(names)
    xs = dict(zip(names, _updates(4, seed=3)))
    survivors = ["c0", "c1", "c3"]  # c2 drops
    want = _weighted_mean([xs[n] for n in survivors], [weights[n] for n in survivors])
    total_w = sum(weights[n] for n in survivors)

    # The first round was masked for all 4: without c2's vector its masks do not cancel.
    first = [maskers[n].protect(xs[n], weights[n], names, nonce=10) for n in survivors]
    broken = decode(aggregate(first), total_w)
    assert float((broken - want).abs().median()) > 1e6

    # Redone over the survivors with a fresh nonce, the masks cancel again.
    redo = [maskers[n].protect(xs[n], weights[n], survivors, nonce=11) for n in survivors]
    err = (decode(aggregate(redo), total_w) - want).abs()
    assert float(err.max()) <= min(1e-6, _bound(3, total_w, SCALE_BITS) + 1e-15 * float(want.abs().max()))

    with pytest.raises(ValueError, match="already used"):
        maskers["c0"].protect(xs["c0"], 1.0, survivors, nonce=10)


def test_errors():
    with pytest.raises(OverflowError, match="below 2\\*\\*38"):
        encode(torch.tensor([1.0, 2.0**37]), 2.0)
    encode(torch.tensor([2.0**38 - 1.0], dtype=torch.float64), 1.0)  # just inside
    with pytest.raises(OverflowError, match="non-finite"):
        encode(torch.tensor([1.0, float("nan")]), 1.0)
    with pytest.raises(OverflowError, match="non-finite"):
        encode(torch.tensor([float("-inf")]), 1.0)
    with pytest.raises(TypeError):
        encode(torch.tensor([1, 2]), 1.0)

    kp = KeyPair.generate()
    with pytest.raises(ValueError, match="32 raw bytes"):
        kp.shared_key(b"\x01" * 31, CONTEXT)
    with pytest.raises(ValueError, match="32 raw bytes"):
        kp.shared_key(kp.public + b"\x00", CONTEXT)

    with pytest.raises(ValueError, match="own peers"):
        mask(encode(torch.ones(3), 1.0), "a", {"a": bytes(32), "b": bytes(32)}, nonce=0)

    maskers = _roster(["a", "b"])
    with pytest.raises(KeyError, match="no agreed key"):
        maskers["a"].protect(torch.ones(3), 1.0, ["a", "b", "z"], nonce=0)
    with pytest.raises(ValueError, match="not among"):
        maskers["a"].protect(torch.ones(3), 1.0, ["b"], nonce=0)
    with pytest.raises(ValueError, match="at least 2"):
        maskers["a"].protect(torch.ones(3), 1.0, ["a"], nonce=0)
    with pytest.raises(ValueError, match="not this client's"):
        maskers["a"].agree({"a": maskers["b"].public, "b": maskers["b"].public})
    with pytest.raises(ValueError, match="total_weight"):
        decode(torch.zeros(3, dtype=torch.int64), 0.0)
