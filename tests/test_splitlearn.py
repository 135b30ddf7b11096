"""SplitLearn's API (``ModelFactory``, ``SplitModel``) on tiny models with the real layer counts, at the cut points
SplitLearn's docs recommend: its examples' and trainer's lines run unchanged and give transformers' numbers."""

from __future__ import annotations

import pickle

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import TINY, VOCAB, batch
from splittrain import ModelFactory, SplitModel
from test_loading import SafeOpenSpy

TOL = 1e-5
SMALL = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32)
# The real models' layer counts and attention shapes, at toy width.
REAL = {
    "gemma-2b": dict(model_type="gemma", num_hidden_layers=18, num_attention_heads=2, num_key_value_heads=1,
                     head_dim=8),  # MQA, tied
    "gemma-7b": dict(model_type="gemma", num_hidden_layers=28, num_attention_heads=2, num_key_value_heads=2,
                     head_dim=12),  # MHA, heads * head_dim != hidden, tied
    "qwen2-0.5b": dict(model_type="qwen2", num_hidden_layers=24, num_attention_heads=4, num_key_value_heads=2,
                       tie_word_embeddings=True),
    "qwen2-7b": dict(model_type="qwen2", num_hidden_layers=28, num_attention_heads=4, num_key_value_heads=1,
                     tie_word_embeddings=False),
    "llama-2-7b": dict(model_type="llama", num_hidden_layers=32, num_attention_heads=2, num_key_value_heads=2,
                       tie_word_embeddings=False),
    "gpt2": dict(model_type="gpt2", num_hidden_layers=12, num_attention_heads=2, n_positions=64, resid_pdrop=0.0,
                 embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0),  # SplitLearn's quick start
}


@pytest.fixture
def real(tmp_path):
    """``real(name, sharded=True) -> (hf_model, folder)``: a tiny random model of ``REAL[name]``, saved."""

    def make(name: str, sharded: bool = True):
        kwargs = {**SMALL, **REAL[name]}
        config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param) * 0.1)  # Gemma norms and biases start at zero
        folder = tmp_path / f"{name}-{'sharded' if sharded else 'single'}"
        model.save_pretrained(folder, max_shard_size="40KB" if sharded else "1GB")
        assert len(list(folder.glob("*.safetensors"))) > 1 if sharded else (folder / "model.safetensors").is_file()
        return model.eval(), folder

    return make


def labels_for(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return ids.masked_fill(mask == 0, -100)


# ------------------------------------------------------------------------------------------ training step
@pytest.mark.parametrize("name, cuts, sharded, padding", [
    ("gemma-2b", (6, 12), True, "left"),     # balanced
    ("gemma-2b", (4, 14), False, "right"),   # server-heavy
    ("gemma-7b", (9, 19), True, "right"),
    ("gemma-7b", (6, 22), False, "left"),
    ("qwen2-0.5b", (8, 16), True, "left"),   # qwen2_example.py
    ("qwen2-7b", (8, 24), False, "right"),   # qwen2_incremental_loading.py
    ("llama-2-7b", (8, 24), True, "left"),   # INCREMENTAL_LOADING.md's batch example
    ("gpt2", (2, 10), True, "right"),        # README quick start, basic_split.py
])
def test_splitlearn_training_step_gives_the_unsplit_loss_and_gradients(real, name, cuts, sharded, padding):
    model, folder = real(name, sharded)
    model_type = REAL[name]["model_type"] if sharded else None  # default: the checkpoint's own
    bottom, trunk, top = ModelFactory.create_split_models(model_type, str(folder), *cuts, device="cpu",
                                                          low_memory=True)
    assert all(isinstance(p, SplitModel) for p in (bottom, trunk, top))
    ids, mask = batch(padding)
    labels = labels_for(ids, mask)

    # SplitLearn's trainer: detach at each cut, then backward by hand through top, trunk and bottom.
    hidden_1 = bottom(ids, attention_mask=mask)
    assert isinstance(hidden_1, torch.Tensor) and hidden_1.shape == (*ids.shape, SMALL["hidden_size"])
    cut_1 = hidden_1.detach().requires_grad_(True)
    hidden_2 = trunk(cut_1, attention_mask=mask)
    assert isinstance(hidden_2, torch.Tensor) and hidden_2.shape == hidden_1.shape
    cut_2 = hidden_2.detach().requires_grad_(True)
    output = top(cut_2, attention_mask=mask, labels=labels)
    output.loss.backward()
    hidden_2.backward(cut_2.grad)
    hidden_1.backward(cut_1.grad)

    expected = model(ids, attention_mask=mask, labels=labels)
    expected.loss.backward()
    assert (output.logits - expected.logits).abs().max() <= TOL
    assert abs(output.loss.item() - expected.loss.item()) <= TOL
    split_grads = {}
    for part in (bottom, trunk, top):
        for key, param in part.named_parameters():
            split_grads[key] = param.grad
    reference = dict(model.named_parameters())
    assert set(split_grads) == set(reference) - ({"lm_head.weight"} if model.config.tie_word_embeddings else set())
    for key, grad in split_grads.items():
        assert (grad - reference[key].grad).abs().max() <= TOL, key


def test_splitlearn_examples_inference_and_greedy_loop(real):
    """gemma_example.py / basic_split.py: no mask, ``output.logits[0, -1].argmax()``, re-running the prefix."""
    model, folder = real("gemma-2b")
    bottom, trunk, top = ModelFactory.create_split_models(
        model_type="gemma", model_name_or_path=str(folder), split_point_1=6, split_point_2=12, device="cpu")
    generated = torch.tensor([[5, 17, 42]])
    with torch.no_grad():
        for _ in range(4):
            output = top(trunk(bottom(generated)))
            assert (output.logits - model(generated).logits).abs().max() <= TOL
            next_token = output.logits[0, -1].argmax(dim=-1).unsqueeze(0).unsqueeze(0)
            generated = torch.cat([generated, next_token], dim=1)
    assert generated.shape == (1, 7)


# ------------------------------------------------------------------------------------------ saved paths
def test_auto_save_then_load_by_splitlearn_names_never_unpickles(real, tmp_path, monkeypatch):
    model, folder = real("qwen2-7b")
    storage = tmp_path / "saved" / "qwen2"
    ModelFactory.create_split_models("qwen2", str(folder), 8, 24, device="cpu", low_memory=True,
                                     storage_path=str(storage), auto_save=True)
    assert sorted(p.name for p in storage.iterdir()) == ["bottom", "top", "trunk"]
    assert not list(storage.rglob("*.pt")) and not list(storage.rglob("*.bin"))

    unpickled = []

    def refuse(*args, **kwargs):
        unpickled.append(args)
        raise AssertionError("something was unpickled")

    for module, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(module, name, refuse)
    bottom = SplitModel.load(f"{storage}/bottom.pt", device="cpu")
    trunk = SplitModel.load(f"{storage}/trunk.pt", device="cpu")
    top = SplitModel.load(f"{storage}/top.pt", device="cpu")
    assert bottom.model.embed_tokens.weight.shape[0] == VOCAB
    assert all(next(p.parameters()).device == torch.device("cpu") for p in (bottom, trunk, top))
    ids, mask = batch("left")
    with torch.no_grad():
        got = top(trunk(bottom(ids, attention_mask=mask), attention_mask=mask), attention_mask=mask).logits
        assert (got - model(ids, attention_mask=mask).logits).abs().max() <= TOL

    # A real pickled file, e.g. what SplitLearn's own auto_save writes, is refused unread.
    pickled = tmp_path / "splitlearn" / "bottom" / "qwen2_8-24_bottom.pt"
    pickled.parent.mkdir(parents=True)
    monkeypatch.undo()
    torch.save(bottom.state_dict(), pickled)
    for module, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(module, name, refuse)
    with pytest.raises(ValueError, match=r"never unpickles.*create_split_models\(.*auto_save=True\)"):
        SplitModel.load(pickled)
    assert unpickled == []
    # the part of a folder holding several (``splittrain split``'s client folder) by its .pt name
    bottom.save(tmp_path / "one")
    assert SplitModel.load(tmp_path / "one" / "bottom.pt").segment.name == "bottom"
    with pytest.raises(FileNotFoundError, match="not a saved segment folder"):
        SplitModel.load(storage / "middle.pt")


# ------------------------------------------------------------------------------------------ errors
def test_errors_as_splitlearn_documents_them(real, tmp_path):
    _, folder = real("gemma-2b", sharded=False)
    with pytest.raises(KeyError, match=r"'gpt-j' is not supported; supported model types: .*gemma.*llama.*qwen2"):
        ModelFactory.create_split_models("gpt-j", str(folder), 6, 12)
    with pytest.raises(ValueError, match=r"model_type 'qwen2' does not match .* model_type 'gemma'"):
        ModelFactory.create_split_models("qwen2", str(folder), 6, 12)
    storage = tmp_path / "never"
    for cuts, offending in (((0, 12), r"\[0\]"), ((6, 18), r"\[18\]"), ((12, 6), r"\(12, 6\)"), ((6, 6), r"\(6, 6\)")):
        with pytest.raises(ValueError, match=offending):
            ModelFactory.create_split_models("gemma", str(folder), *cuts, storage_path=storage, auto_save=True)
    assert not storage.exists()
    with pytest.raises(ValueError, match="auto_save=True needs storage_path"):
        ModelFactory.create_split_models("gemma", str(folder), 6, 12, auto_save=True)


# ------------------------------------------------------------------------------------------ other arguments
def test_parts_builds_and_reads_only_those(real, monkeypatch):
    model, folder = real("qwen2-0.5b")
    spy = SafeOpenSpy(monkeypatch)
    bottom, trunk, top = ModelFactory.create_split_models("qwen2", str(folder), 8, 16, parts=["trunk"])
    assert bottom is None and top is None and isinstance(trunk, SplitModel)
    assert set(spy.tensors) == set(trunk.state_dict())
    assert all(k.startswith("model.layers.") and 8 <= int(k.split(".")[2]) < 16 for k in spy.tensors)
    monkeypatch.undo()
    bottom, trunk, top = ModelFactory.create_split_models("qwen2", str(folder), 8, 16, parts=("bottom", "top"))
    assert trunk is None
    with pytest.raises(ValueError, match="unknown part"):
        ModelFactory.create_split_models("qwen2", str(folder), 8, 16, parts=["middle"])


def test_torch_dtype_and_dtype(real):
    _, folder = real("gemma-2b")
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    ids, mask = batch("left")
    for kwargs in ({"torch_dtype": torch.bfloat16}, {"dtype": "bfloat16"}, {"torch_dtype": "torch.bfloat16"}):
        bottom, trunk, top = ModelFactory.create_split_models("gemma", str(folder), 6, 12, **kwargs)
        assert all(p.dtype == torch.bfloat16 for part in (bottom, trunk, top) for p in part.parameters())
        with torch.no_grad():
            got = top(trunk(bottom(ids, attention_mask=mask), attention_mask=mask), attention_mask=mask).logits
            assert torch.equal(got, reference(ids, attention_mask=mask).logits)
    with pytest.raises(ValueError, match="disagree"):
        ModelFactory.create_split_models("gemma", str(folder), 6, 12, torch_dtype=torch.float16, dtype="bfloat16")


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_attn_implementation_is_exact(real, implementation):
    _, folder = real("qwen2-0.5b", sharded=False)
    reference = AutoModelForCausalLM.from_pretrained(folder, attn_implementation=implementation).eval()
    bottom, trunk, top = ModelFactory.create_split_models("qwen2", str(folder), 8, 16,
                                                          attn_implementation=implementation)
    assert {p.config._attn_implementation for p in (bottom, trunk, top)} == {implementation}
    ids, mask = batch("left")
    with torch.no_grad():
        got = top(trunk(bottom(ids, attention_mask=mask), attention_mask=mask), attention_mask=mask).logits
        assert (got - reference(ids, attention_mask=mask).logits).abs().max() <= TOL


# ------------------------------------------------------------------------------------------ modes and KV cache
# The seeds' cuts of a 4-layer model and the other two places a one-layer part can sit (Gemma-3's layers are
# sliding, sliding, full, sliding: each cut gives the parts another mix of kinds).
TINY_CUTS = [(1, 3), (2, 3), (1, 2)]
NEW_TOKENS = 6


def with_dropout(family: str) -> dict[str, float]:
    """Dropout on in the saved config: GPT-2's three, the attention dropout of the others."""
    if family == "gpt2":
        return dict(resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    return dict(attention_dropout=0.1)


@pytest.mark.parametrize("family", sorted(TINY))
def test_parts_infer_as_from_pretrained_without_eval(checkpoint, family):
    """SplitLearn's quick start with dropout in the config: neither side is put in eval mode by hand."""
    _, folder = checkpoint(family, **with_dropout(family))
    reference = AutoModelForCausalLM.from_pretrained(folder)
    ids, mask = batch("left")
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask).logits
        for cuts in TINY_CUTS:
            bottom, trunk, top = ModelFactory.create_split_models(None, str(folder), *cuts)
            assert not any(part.training or part.segment.training for part in (bottom, trunk, top))
            for _ in range(2):  # the same logits on every call
                got = top(trunk(bottom(ids, attention_mask=mask), attention_mask=mask), attention_mask=mask).logits
                assert (got - expected).abs().max() <= TOL, cuts


@pytest.mark.parametrize("family", ["gpt2", "qwen2", "gemma3"])
def test_train_mode_has_the_unsplit_models_dropout(checkpoint, family):
    """``.train()`` turns dropout on in every part, and under one seed the split draws the unsplit model's masks:
    its modules run in the same order on the same shapes, so they consume the RNG alike."""
    _, folder = checkpoint(family, **with_dropout(family))
    reference = AutoModelForCausalLM.from_pretrained(folder).train()
    parts = ModelFactory.create_split_models(None, str(folder), 1, 3)
    for part in parts:
        assert part.train() is part and part.segment.training
        assert all(m.training for m in part.modules())
    bottom, trunk, top = parts
    ids, mask = batch("left")
    labels = labels_for(ids, mask)

    def split(seed: int):
        torch.manual_seed(seed)
        return top(trunk(bottom(ids, attention_mask=mask), attention_mask=mask), attention_mask=mask, labels=labels)

    torch.manual_seed(7)
    expected = reference(ids, attention_mask=mask, labels=labels)
    got = split(7)
    assert (got.logits - expected.logits).abs().max() <= TOL
    assert abs(got.loss.item() - expected.loss.item()) <= TOL
    assert (split(8).logits - expected.logits).abs().max() > 100 * TOL  # another seed, other dropout masks
    for part in parts:
        part.eval()
        assert not part.segment.training and not any(m.training for m in part.modules())


def decode_with_transformers(model, ids, mask):
    """transformers' own cached decoding: the prompt with ``use_cache=True``, then one token at a time."""
    out = model(ids, attention_mask=mask, use_cache=True)
    logits, tokens = [out.logits], []
    for _ in range(NEW_TOKENS):
        token = out.logits[:, -1:].argmax(-1)
        tokens.append(token)
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        out = model(token, attention_mask=mask, cache=out.cache, use_cache=True)
        logits.append(out.logits)
    return logits, tokens


def decode_splitlearn_style(bottom, trunk, top, ids, mask):
    """The same loop as a SplitLearn user writes it (generate_with_cache.py): one cache per part."""
    hidden, past_1 = bottom(ids, attention_mask=mask, use_cache=True)
    hidden, past_2 = trunk(hidden, attention_mask=mask, use_cache=True)
    out = top(hidden, attention_mask=mask, use_cache=True)
    logits, tokens = [out.logits], []
    for _ in range(NEW_TOKENS):
        token = out.logits[:, -1:].argmax(-1)
        tokens.append(token)
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        hidden, past_1 = bottom(token, attention_mask=mask, past_key_values=past_1, use_cache=True)
        hidden, past_2 = trunk(hidden, attention_mask=mask, past_key_values=past_2, use_cache=True)
        out = top(hidden, attention_mask=mask, past_key_values=out.past_key_values, use_cache=True)
        logits.append(out.logits)
    return logits, tokens


@pytest.mark.parametrize("family", sorted(TINY))
def test_cached_greedy_loop_equals_transformers(checkpoint, family):
    """Each step's logits and token equal transformers' cached decoding: a left-padded batch with its mask, and
    one prompt without a mask; prompts of 11 outgrow Gemma-2/3's sliding window of 4 and Mistral's of 5."""
    _, folder = checkpoint(family, **with_dropout(family))
    reference = AutoModelForCausalLM.from_pretrained(folder)
    ids, mask = batch("left", length=11)
    prompts = [(ids, mask), (ids[:1], None)]
    with torch.no_grad():
        expected = [decode_with_transformers(reference, *prompt) for prompt in prompts]
        for cuts in TINY_CUTS:
            parts = ModelFactory.create_split_models(None, str(folder), *cuts)
            for prompt, (want_logits, want_tokens) in zip(prompts, expected):
                logits, tokens = decode_splitlearn_style(*parts, *prompt)
                assert len(logits) == len(want_logits) == NEW_TOKENS + 1
                for step, (got, want) in enumerate(zip(logits, want_logits)):
                    assert got.shape == want.shape and (got - want).abs().max() <= TOL, (cuts, step)
                assert torch.equal(torch.cat(tokens, 1), torch.cat(want_tokens, 1)), cuts


def test_cache_misuse_is_refused(checkpoint):
    from transformers import DynamicCache

    _, folder = checkpoint("gpt2")
    bottom, trunk, top = ModelFactory.create_split_models("gpt2", str(folder), 1, 3)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        hidden = trunk(bottom(ids, use_cache=False), use_cache=None)  # no cache asked: bare tensors as before
        assert isinstance(hidden, torch.Tensor)
        hidden, past_1 = bottom(ids, use_cache=True)
        assert isinstance(past_1, DynamicCache) and past_1.get_seq_length() == 3
        legacy = tuple((layer.keys, layer.values) for layer in past_1.layers if layer.get_seq_length())
        with pytest.raises(TypeError, match="must be the transformers cache.*not tuple.*legacy"):
            bottom(ids[:, -1:], past_key_values=legacy, use_cache=True)
        with pytest.raises(ValueError, match=r"holds layers \[1, 3\) but was given a cache of layers \[0\]"):
            trunk(hidden[:, -1:], past_key_values=past_1, use_cache=True)  # the bottom's present
        with pytest.raises(ValueError, match="covers 1 positions; with 3 cached and 1 new it must cover 4"):
            bottom(ids[:, -1:], attention_mask=torch.ones(1, 1), past_key_values=past_1, use_cache=True)
        with pytest.raises(ValueError, match="past_key_values with use_cache=False"):
            bottom(ids[:, -1:], past_key_values=past_1, use_cache=False)
        assert past_1.get_seq_length() == 3  # nothing refused was cached
    with pytest.raises(TypeError, match="pass labels to the top"):
        trunk(hidden, labels=ids)
