"""The chunked LM head + cross-entropy (``model.loss_chunk``) gives the plain path's loss, gradients and metrics without
ever holding whole logits (fp32, 1e-6)."""

from __future__ import annotations

import dataclasses
import inspect

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader
from torch.utils._python_dispatch import TorchDispatchMode

import splittrain
from splittrain.federated import FederatedSettings
from splittrain.lora import adapter_state_dict
from splittrain.loss import LOSS_CHUNK, chunked_causal_lm_loss
from splittrain.metrics import TokenMetrics, token_stats
from splittrain.modules import ClientModule, TrunkSettings
from conftest import VOCAB, batch, tiny_model
from test_training import CUTS, LORA, OPTIM, STEPS, batches, trainer

FAMILIES = ["qwen2", "gemma", "gemma3", "gemma2", "gpt2"]  # untied, tied, softcap + tied, softcap, Conv1D + tied


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str, tol: float = 1e-6) -> None:
    """Each element within ``tol`` of the tensor's largest magnitude (and relatively)."""
    scale = want.abs().max().item() if want.numel() else 0.0
    diff = (got - want).abs().max().item() if want.numel() else 0.0
    assert diff <= tol * max(scale, 1e-30), f"{what}: max abs diff {diff} against max abs {scale}"


def split_chain(family: str):
    model = tiny_model(family)
    return model, splittrain.split_model(model, cuts=(1, 3))


def inputs(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded ids and labels with -100s (padding and a prompt), a third of them the model's own next-token guess,
    so that token accuracy counts hits."""
    ids, mask = batch("right", batch_size=3, length=11)
    with torch.no_grad():
        guess = model(ids, attention_mask=mask).logits.argmax(-1)
    labels = ids.clone()
    labels[:, 1::3] = guess[:, 0:-1:3]
    labels = labels.masked_fill(mask == 0, -100)
    labels[0, :3] = -100  # a prompt
    return ids, mask, labels


def run(parts, ids, mask, labels, chunk: int, **loss_kwargs):
    """Loss, token stats and every trainable parameter's gradient of one pass through the chain."""
    bottom, trunk, top = parts
    top.loss_chunk = chunk
    for segment in parts:
        segment.zero_grad(set_to_none=True)
    out = top(trunk(bottom(ids, attention_mask=mask)), labels=labels, **loss_kwargs)
    out.loss.backward()
    stats = token_stats(out.logits, labels) if out.logits is not None else out.token_stats
    grads = {f"{s.name}.{n}": p.grad.clone() for s in parts for n, p in s.named_parameters() if p.requires_grad}
    return out, stats, grads


HEAD = ("lm_head.weight", "model.embed_tokens.weight", "transformer.wte.weight", "model.norm.weight",
        "transformer.ln_f.weight", "transformer.ln_f.bias")
"""The head's weight (or the tied embedding) and the final norm: their gradients are one step from the loss."""


def worst_error(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    return max(((grads[n].double() - reference[n]).norm() / reference[n].norm()).item() for n in reference)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("head", ["trains", "frozen"])
def test_chunked_loss_gradients_and_stats_equal_the_plain_path(family, head):
    """Chunks that do and do not divide the trained positions (20 here), mean and num_items_in_batch (tensor, int):
    the loss, token stats and the gradients of the head's weight or tied embedding (which gets the bottom's gradient
    too) and of the final norm are those of whole logits through transformers' loss (1e-6); the layers' gradients,
    where backward amplifies float32 rounding, are within 5e-6, and no further from a float64 run than the plain
    path's own (about 2e-6)."""
    model, parts = split_chain(family)
    ids, mask, labels = inputs(model)
    # transformers' Gemma-2 gives nan gradients in float64 (its softcapped attention over masked positions)
    exact = splittrain.split_model(tiny_model(family).double(), cuts=(1, 3)) if family != "gemma2" else None
    for segment in (*parts, *(exact or ())):
        segment.requires_grad_(True)
    if head == "frozen":  # only dL/dhidden is wanted of the head: computed in the forward pass
        parts[2].head_weight()[0].requires_grad_(False)
        if exact is not None:
            exact[2].head_weight()[0].requires_grad_(False)
    trained = int((labels[:, 1:] != -100).sum())
    assert trained == 20
    for loss_kwargs in ({}, {"num_items_in_batch": torch.tensor(31)}, {"num_items_in_batch": 29}):
        plain, plain_stats, plain_grads = run(parts, ids, mask, labels, 0, **loss_kwargs)
        reference = run(exact, ids, mask, labels, 0, **loss_kwargs)[2] if exact is not None else None
        assert plain.logits is not None and int(plain_stats.correct) > 0
        for chunk in (1, 5, 7, 20, 32, 33):
            out, stats, grads = run(parts, ids, mask, labels, chunk, **loss_kwargs)
            what = f"{family} chunk {chunk} {loss_kwargs}"
            if chunk >= ids.numel():  # the whole batch is one chunk: the plain path, to the bit
                assert torch.equal(out.logits, plain.logits) and torch.equal(out.loss, plain.loss)
                assert all(torch.equal(grads[name], plain_grads[name]) for name in grads)
                continue
            assert out.logits is None
            assert_close(out.loss, plain.loss, f"{what} loss")
            assert int(stats.count) == int(plain_stats.count) == trained
            assert int(stats.correct) == int(plain_stats.correct), what
            assert_close(stats.nll, plain_stats.nll, f"{what} nll")
            assert grads.keys() == plain_grads.keys()
            for name in grads:
                assert_close(grads[name], plain_grads[name], f"{what} {name}", 1e-6 if name.endswith(HEAD) else 5e-6)
            if reference is not None:
                assert worst_error(grads, reference) <= 1.5 * worst_error(plain_grads, reference), what
    assert any(n.startswith("top.") and n.endswith(HEAD[:3]) for n in plain_grads) == (head == "trains")


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_chunked_loss_of_hidden_states_and_shift_labels(family):
    """The function alone on hidden states after the norm: gradients of the hidden states, the head weight and a
    bias equal autograd through ``ForCausalLMLoss``; ``shift_labels`` and ``ignore_index`` as transformers takes
    them; every label ignored gives transformers' nan (mean) and 0 (sum over num_items_in_batch)."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, 13, 16, generator=g)
    weight, bias = torch.randn(50, 16, generator=g), torch.randn(50, generator=g)
    labels = torch.randint(0, 50, (2, 13), generator=g)
    labels[1, 3:7] = -7
    cap = 3.0 if family == "gemma3" else None

    def plain(h, w, b, **kwargs):
        logits = torch.nn.functional.linear(h, w, b)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return ForCausalLMLoss(logits, kwargs.pop("labels", None), 50, **kwargs)

    shifted = torch.nn.functional.pad(labels, (0, 1), value=-7)[:, 1:].contiguous()
    for kwargs in ({"labels": labels, "ignore_index": -7}, {"shift_labels": shifted, "ignore_index": -7},
                   {"labels": labels, "ignore_index": -7, "num_items_in_batch": torch.tensor(40)}):
        leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
        want = plain(*leaves, **kwargs)
        want_grads = torch.autograd.grad(want, leaves)
        for chunk in (3, 8, 100):
            leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
            got, stats = chunked_causal_lm_loss(leaves[0], leaves[1], kwargs.get("labels"), leaves[2], chunk=chunk,
                                                softcap=cap, **{k: v for k, v in kwargs.items() if k != "labels"})
            assert_close(got, want, f"loss chunk {chunk}")
            assert int(stats.count) == int((shifted != -7).sum())
            for name, a, b in zip(("hidden", "weight", "bias"), torch.autograd.grad(got, leaves), want_grads):
                assert_close(a, b, f"{name} chunk {chunk} {list(kwargs)}")
    none = torch.full_like(labels, -100)
    h = hidden.clone().requires_grad_(True)
    loss, stats = chunked_causal_lm_loss(h, weight, none, chunk=4, softcap=cap)
    assert torch.isnan(loss) and torch.isnan(plain(hidden, weight, None, labels=none))
    loss, _ = chunked_causal_lm_loss(h, weight, none, chunk=4, softcap=cap, num_items_in_batch=3)
    loss.backward()
    assert loss.item() == 0 and int(stats.count) == 0 and h.grad.abs().sum() == 0


def test_chunked_loss_under_bf16_autocast_is_the_plain_path_to_bf16_rounding():
    """Under autocast the chunks compute in bf16 as the plain head does (then float32 for the loss)."""
    model, parts = split_chain("gemma3")
    ids, mask, labels = inputs(model)
    for segment in parts:
        segment.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, _, plain_grads = run(parts, ids, mask, labels, 0)
        out, _, grads = run(parts, ids, mask, labels, 5)
    assert out.loss.dtype == torch.float32
    assert_close(out.loss, plain.loss, "loss", tol=1e-2)
    for name in grads:
        assert grads[name].dtype == plain_grads[name].dtype == torch.float32
        assert_close(grads[name], plain_grads[name], name, tol=5e-2)


def test_generation_and_unlabelled_passes_keep_their_logits():
    model, parts = split_chain("qwen2")
    bottom, trunk, top = parts
    top.loss_chunk = 4
    ids, mask = batch(None)
    with torch.no_grad():
        whole = top(trunk(bottom(ids, attention_mask=mask)))
        last = top(trunk(bottom(ids, attention_mask=mask)), logits_to_keep=1)
        assert torch.equal(whole.logits, model(ids, attention_mask=mask).logits)
    assert last.logits.shape == (3, 1, VOCAB)


class LargestTensor(TorchDispatchMode):
    """The largest tensor (elements) any operation produces while active."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("head", ["trains", "frozen"])
def test_no_tensor_of_whole_logits_is_ever_made(head):
    """A training step of the top at a vocabulary larger than everything else: with loss_chunk 32 no operation
    makes a tensor of more than 32 x vocab elements (forward and backward), the plain path makes tokens x vocab."""
    vocab, tokens = 4096, 2 * 128
    model = tiny_model("qwen2", vocab_size=vocab)
    top = splittrain.split_model(model, cuts=(3,))["top"]
    top.requires_grad_(True)
    top.head_weight()[0].requires_grad_(head == "trains")
    hidden = torch.randn(2, 128, 32)
    labels = torch.randint(0, vocab, (2, 128))
    largest = {}
    for chunk in (0, 32):
        top.loss_chunk = chunk
        with LargestTensor() as probe:
            top(hidden.clone().requires_grad_(True), labels=labels).loss.backward()
        largest[chunk] = probe.largest
    assert largest[0] >= tokens * vocab
    assert largest[32] <= 32 * vocab


def test_loss_chunk_setting():
    assert inspect.signature(ClientModule).parameters["loss_chunk"].default == LOSS_CHUNK
    with pytest.raises(ValueError, match="loss_chunk"):
        ClientModule(loss_chunk=-1)


STEADY = dataclasses.replace(OPTIM, eps=1e-3)
"""AdamW divides each gradient element by its root mean square + eps: an element whose gradient is 0 but for float
rounding moves by up to lr either way at eps 1e-8 (whole logits and chunks then differ by 1e-4 after five steps, as
any change of summation order would make them); eps 1e-3 bounds that amplification to lr / eps = 20."""


def split_run(folder, tmp_path, client: str, accumulate: int, **options):
    module = ClientModule(model=str(folder), cuts=CUTS, client=client, client_lora=LORA, optim=STEADY,
                          trunk=TrunkSettings(lora=LORA, optim=STEADY), seed=3, **options)
    data = DataLoader(batches(STEPS * accumulate), batch_size=None)
    trainer(tmp_path, accumulate, clip=0.5).fit(module, train_dataloaders=data)
    weights = {**module.client_adapters(), **adapter_state_dict(module.server.trunk)}
    if client == "full":
        weights.update({k: v for s in (module.bottom, module.top) for k, v in s.state_dict().items()})
    return module, weights


@pytest.mark.parametrize("family,client,pipeline,accumulate", [
    ("qwen2", "full", 1, 2),   # untied head trains, gradient accumulation
    ("gemma", "full", 2, 1),   # tied embedding trains, pipelined micro-batches
    ("gemma3", "lora", 2, 2),  # softcap, frozen head, pipelined and accumulated
])
def test_split_training_with_loss_chunk_equals_whole_logits(checkpoint, tmp_path, family, client, pipeline, accumulate):
    """Split training with chunks of 5 positions (a batch has up to 16), clipping on, gives the losses (1e-6
    relative) and weights (1e-6 absolute) of whole logits, and validation's loss, perplexity and token accuracy."""
    _, folder = checkpoint(family)
    runs = {}
    for chunk in (0, 5):
        module, weights = split_run(folder, tmp_path / str(chunk), client, accumulate, pipeline=pipeline,
                                    loss_chunk=chunk)
        assert module.top.loss_chunk == chunk
        check = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
                          default_root_dir=tmp_path, accelerator="cpu")
        val = check.validate(module, dataloaders=DataLoader(batches(3), batch_size=None), verbose=False)[0]
        runs[chunk] = module._stats["losses"], weights, val
    (losses, weights, val), (plain_losses, plain_weights, plain_val) = runs[5], runs[0]
    assert len(losses) == len(plain_losses) == STEPS * accumulate
    assert plain_losses[-accumulate] < plain_losses[0] - 0.05  # it trains
    for i, (a, b) in enumerate(zip(losses, plain_losses)):
        assert abs(a - b) <= 1e-6 * abs(b), f"step {i}: {a} vs {b}"
    assert weights.keys() == plain_weights.keys()
    if client == "full":
        assert any("lm_head" in k or "embed_tokens" in k for k in weights)
    for key in weights:
        diff = (weights[key] - plain_weights[key]).abs().max().item()
        assert diff <= 1e-6, f"{key}: max abs diff {diff}"
    assert val.keys() == plain_val.keys() >= {"val_loss", "val_perplexity", "val_token_accuracy"}
    for name in val:
        assert val[name] == pytest.approx(plain_val[name], rel=1e-6, abs=1e-6), name


def test_federated_clients_with_loss_chunk_equal_whole_logits(checkpoint, tmp_path):
    """Two simulated clients averaging gradients (FedSGD), the head training: chunks or whole logits, the same."""
    from test_federated import ClientData

    _, folder = checkpoint("qwen2")
    fed = FederatedSettings(clients=2, average="gradients")
    weights = {}
    for chunk in (0, 4):
        module = ClientModule(model=str(folder), cuts=CUTS, client="full", client_lora=LORA, optim=STEADY,
                              trunk=TrunkSettings(lora=LORA, optim=STEADY), seed=3, federated=fed, loss_chunk=chunk)
        trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                            default_root_dir=tmp_path, accelerator="cpu")
        trainer.fit(module, datamodule=ClientData(2, 3, [4, 4]))
        weights[chunk] = ({k: v.detach().clone() for s in (module.bottom, module.top) for k, v in s.state_dict().items()}
                          | adapter_state_dict(module.server.trunk), [c.losses for c in module.clients.values()])
    (got, got_losses), (want, want_losses) = weights[4], weights[0]
    assert sum(want_losses, []) == pytest.approx(sum(got_losses, []), rel=1e-6)
    for key in want:
        diff = (got[key] - want[key]).abs().max().item()
        assert diff <= 1e-6, f"{key}: max abs diff {diff}"


def test_token_metrics_from_stats_equal_metrics_from_logits():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 9, 20, generator=g)
    labels = torch.randint(0, 20, (3, 9), generator=g)
    labels[:, 2::4] = logits[:, 1::4].argmax(-1)[:, :labels[:, 2::4].shape[1]]
    labels[1, 5:] = -100
    a, b = TokenMetrics(20), TokenMetrics(20)
    a.update(logits, labels)
    b.update_stats(token_stats(logits, labels))
    got, want = b.compute(), a.compute()
    assert 0 < float(want["token_accuracy"]) < 1
    for name in want:
        assert torch.equal(got[name], want[name]), name
    from torchmetrics.classification import MulticlassAccuracy
    from torchmetrics.text import Perplexity

    targets = labels[:, 1:]
    assert float(want["perplexity"]) == pytest.approx(
        float(Perplexity(ignore_index=-100)(logits[:, :-1], targets)), rel=1e-6)
    assert float(want["token_accuracy"]) == pytest.approx(float(MulticlassAccuracy(
        20, ignore_index=-100, average="micro")(logits[:, :-1].argmax(-1).flatten(), targets.flatten())), rel=1e-6)
