"""Chained segments compute exactly what the unsplit transformers model computes: logits and gradients."""

from __future__ import annotations

import pytest
import torch

import splittrain
from splittrain import Activations
from conftest import TINY, batch, tiny_model

TOL = 1e-5


def chain(parts, ids, mask, labels=None):
    state = parts[0](ids, attention_mask=mask)
    for segment in parts[1:-1]:
        state = segment(state)
    return parts[-1](state, labels=labels)


# Every legal cut position of a 4-layer model, as two, three and four parts.
CUTS = [(1,), (3,), (1, 2), (2, 3), (1, 3), (1, 2, 3)]


@pytest.mark.parametrize("family", sorted(TINY))
@pytest.mark.parametrize("padding", [None, "left", "right"])
def test_logits_match_unsplit_model(checkpoint, family, padding):
    model, folder = checkpoint(family)
    ids, mask = batch(padding)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        for cuts in CUTS:
            parts = splittrain.split_model(folder, cuts=cuts)
            got = chain(parts, ids, mask).logits
            assert got.shape == expected.shape
            diff = (got - expected).abs().max().item()
            assert diff <= TOL, f"{family} cuts={cuts} padding={padding}: max abs diff {diff}"


@pytest.mark.parametrize(
    "family, overrides",
    [
        ("qwen2", dict(tie_word_embeddings=True)),
        ("qwen2", dict(num_key_value_heads=1)),  # MQA with biases
        ("llama", dict(num_key_value_heads=1)),  # MQA
        ("llama", dict(num_key_value_heads=2, tie_word_embeddings=True)),  # GQA, tied
        ("gemma", dict(num_attention_heads=4, num_key_value_heads=4, head_dim=16)),  # MHA, 4*16 != 32
        ("gemma", dict(tie_word_embeddings=False)),
        ("gemma3", dict(final_logit_softcapping=None, tie_word_embeddings=False)),
        ("gemma3", dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=3)),  # GQA
    ],
)
def test_logits_match_variants(checkpoint, family, overrides):
    model, folder = checkpoint(family, **overrides)
    ids, mask = batch("left", length=13)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        got = chain(splittrain.split_model(folder, cuts=(1, 3)), ids, mask).logits
    assert (got - expected).abs().max().item() <= TOL


def test_gemma3_sequences_longer_than_window_use_sliding_masks(checkpoint):
    """With a window of 4 and 16 tokens, sliding layers see only the last 4 keys: changing an early token
    must not change what a sliding-only prefix computes for late positions, and the split must follow."""
    model, folder = checkpoint("gemma3", layer_types=["sliding_attention"] * 2 + ["full_attention"] * 2)
    ids, mask = batch("right", length=16)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        parts = splittrain.split_model(folder, cuts=(2,))
        got = chain(parts, ids, mask).logits
        assert (got - expected).abs().max().item() <= TOL
        # bottom = the two sliding layers: position 15 sees positions 12..15 only (receptive field 12..15
        # after one layer, 9..15 after two), so token 0 cannot reach it.
        changed = ids.clone()
        changed[:, 0] = (changed[:, 0] + 1) % model.config.vocab_size
        full = torch.ones_like(mask)
        a = parts[0](ids, attention_mask=full).hidden_states[:, -1]
        b = parts[0](changed, attention_mask=full).hidden_states[:, -1]
        assert torch.equal(a, b)
        assert not torch.equal(parts[1](parts[0](ids, attention_mask=full)).logits,
                               parts[1](parts[0](changed, attention_mask=full)).logits)


@pytest.mark.parametrize("family, overrides", [("qwen2", {}), ("gemma", {}), ("gemma3", {}), ("llama", {}),
                                               ("qwen2", dict(tie_word_embeddings=True)), ("gpt2", {})])
def test_gradients_match_unsplit_model(checkpoint, family, overrides):
    model, folder = checkpoint(family, **overrides)
    ids, mask = batch("left")
    labels = ids.masked_fill(mask == 0, -100)
    model.train()
    model.zero_grad()
    expected_loss = model(ids, attention_mask=mask, labels=labels).loss
    expected_loss.backward()
    expected = {name: p.grad for name, p in model.named_parameters()}

    parts = splittrain.split_model(folder, cuts=(1, 3))
    out = chain(parts, ids, mask, labels=labels)
    out.loss.backward()
    assert abs(out.loss.item() - expected_loss.item()) <= TOL
    seen = set()
    for segment in parts:
        for name, param in segment.named_parameters():
            assert param.grad is not None, name
            diff = (param.grad - expected[name]).abs().max().item()
            assert diff <= TOL, f"{name}: grad diff {diff}"
            seen.add(name)
    assert seen == set(expected)  # every parameter of the model lives in exactly one place
    # The hidden state crossing a cut carries the gradient too.
    h = parts[0](ids, attention_mask=mask)
    h_in = Activations(h.hidden_states.detach().requires_grad_(), h.attention_mask, h.position_ids)
    parts[2](parts[1](h_in), labels=labels).loss.backward()
    assert h_in.hidden_states.grad is not None and h_in.hidden_states.grad.abs().sum() > 0


def test_state_dict_keys_are_checkpoint_keys(checkpoint):
    model, folder = checkpoint("qwen2")
    bottom, trunk, top = splittrain.split_model(folder, cuts=(1, 3))
    full = set(model.state_dict())
    assert set(trunk.state_dict()) == {k for k in full if k.startswith(("model.layers.1.", "model.layers.2."))}
    assert set(bottom.state_dict()) == {k for k in full if k.startswith(("model.layers.0.", "model.embed_tokens."))}
    assert set(top.state_dict()) == {k for k in full if k.startswith(("model.layers.3.", "model.norm.", "lm_head."))}
    assert "model.layers.7.mlp.up_proj.weight" not in trunk.state_dict()
    for key, value in trunk.state_dict().items():
        assert torch.equal(value, model.state_dict()[key])


def test_split_loaded_model_shares_its_modules():
    model = tiny_model("gemma3")
    ids, mask = batch("left")
    bottom, trunk, top = splittrain.split_model(model, cuts=(1, 2))
    assert bottom.model.embed_tokens is model.model.embed_tokens
    assert trunk.model.layers["1"] is model.model.layers[1]
    with torch.no_grad():
        assert (chain([bottom, trunk, top], ids, mask).logits - model(ids, attention_mask=mask).logits).abs().max() <= TOL


def test_segment_input_errors(checkpoint):
    _, folder = checkpoint("llama")
    bottom, top = splittrain.split_model(folder, cuts=(2,))
    ids, mask = batch(None)
    with pytest.raises(TypeError, match="first"):
        bottom(bottom(ids))
    with pytest.raises(TypeError, match="integer input_ids"):
        bottom(torch.randn(1, 3, 32))
    # a bare hidden-state tensor works for a middle/last segment
    h = bottom(ids, attention_mask=mask)
    assert torch.equal(top(h.hidden_states, attention_mask=mask).logits, top(h).logits)


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_packed_rows_match_unsplit_model(checkpoint, family):
    """Packed rows carry position ids that restart per example and no attention mask: every segment must
    rebuild the same block-diagonal mask transformers builds."""
    model, folder = checkpoint(family)
    ids, _ = batch(None, batch_size=2, length=12)
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        expected = model(ids, position_ids=position_ids, use_cache=False).logits
        parts = splittrain.split_model(folder, cuts=(1, 3))
        got = parts[2](parts[1](parts[0](ids, position_ids=position_ids))).logits
        # and the packing really separates examples: the second example alone gives the same logits
        alone = model(ids[:1, 5:], use_cache=False).logits
    assert (got - expected).abs().max() <= TOL
    assert (got[:1, 5:] - alone).abs().max() <= 1e-4
