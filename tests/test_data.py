"""Instruction data: row formats, chat templates, assistant-only labels, padding/packing, the data module, and the
quickstart data, tokenizer and model."""

from __future__ import annotations

import io
import json
import re
from itertools import groupby

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from recipes import get_recipe
from splittrain import quickstart
from splittrain.data import (
    CHAT_TEMPLATES,
    IGNORE_INDEX,
    InstructionDataModule,
    check_rows_file,
    collate,
    fold_system,
    render,
    resolve_chat_template,
    to_messages,
    tokenize_conversation,
)
from splittrain.errors import UserError
from splittrain.quickstart import make_data

CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What colour is a blorp?"},
    {"role": "assistant", "content": "A blorp is purple."},
    {"role": "user", "content": 'Now write "rose" in capital letters.'},
    {"role": "assistant", "content": "ROSE"},
]


def chatml_tokenizer():
    return AutoTokenizer.from_pretrained(quickstart.TOKENIZER_DIR)


def gemma_tokenizer():
    """The quickstart tokenizer with Gemma's control tokens and no template of its own."""
    tokenizer = chatml_tokenizer()
    tokenizer.add_special_tokens({"bos_token": "<bos>", "extra_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tokenizer.chat_template = None
    return tokenizer


def trained_runs(tokenizer, example) -> list[str]:
    """The decoded runs of consecutive positions that carry labels."""
    runs = []
    for trained, run in groupby(zip(example["input_ids"], example["labels"]), key=lambda p: p[1] != IGNORE_INDEX):
        pairs = list(run)
        if trained:
            assert all(token == label for token, label in pairs)  # a label is the token itself (shifted in the loss)
            runs.append(tokenizer.decode([token for token, _ in pairs], skip_special_tokens=False))
    return runs


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return quickstart.model_dir(tmp_path_factory.mktemp("cache"))


# --- rows -> messages -------------------------------------------------------------------------------------------

def test_to_messages_accepts_the_three_row_formats():
    assert to_messages({"messages": [{"role": "user", "content": "hi", "name": None},
                                     {"role": "assistant", "content": "hello"}]}) == [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert to_messages({"instruction": "Add the numbers.", "input": "2 and 3", "output": "5", "system": "Be brief."}) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Add the numbers.\n\n2 and 3"},
        {"role": "assistant", "content": "5"}]
    assert to_messages({"instruction": "Say hi.", "input": "", "output": "hi"}) == [
        {"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]
    assert to_messages({"prompt": "2+2=", "completion": "4"}) == [
        {"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}]


def test_to_messages_rejects_rows_without_an_answer_or_of_unknown_shape():
    with pytest.raises(ValueError, match=r"\['messages'\] has no assistant turn"):
        to_messages({"messages": [{"role": "user", "content": "hi"}]})
    with pytest.raises(ValueError, match=r"\['text', 'title'\].*not an instruction row"):
        to_messages({"text": "free text", "title": "t"})
    with pytest.raises(ValueError, match="string 'role' and 'content'"):
        to_messages({"messages": [{"role": "user"}]})


def test_rows_files_are_checked_before_datasets_reads_them(tmp_path):
    """A bad line is named as file:line with what is wrong and the count of the other bad lines; rows of other
    shapes, null-filled columns (datasets' union of the rows' keys) and U+2028 inside a string are fine."""
    good = json.dumps({"prompt": "2+2=\u2028?", "completion": "4"}, ensure_ascii=False)
    alpaca = json.dumps({"instruction": "Say hi.", "input": None, "output": "hi", "messages": None})
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join([good, "", alpaca, "{broken", json.dumps({"messages": [{"role": "user", "content": "x"}]}),
                                json.dumps([1]), json.dumps({"prompt": 3, "completion": "x"})]) + "\n")
    with pytest.raises(UserError, match=re.escape(f"{path}:4: not valid JSON (Expecting property name enclosed in "
                                                  "double quotes at column 2) (3 more bad lines: 5, 6, 7)")):
        check_rows_file(path)
    with pytest.raises(UserError, match=re.escape(f"{path}:4: not valid JSON")):
        check_rows_file(path, limit=2)  # JSON is checked everywhere, shapes only in the first `limit` rows
    path.write_text("\n".join([good, alpaca, json.dumps({"messages": [{"role": "user", "content": "x"}]})]))
    assert check_rows_file(path, limit=2)
    with pytest.raises(UserError, match=re.escape(f"{path}:3: row with keys ['messages'] has no assistant turn "
                                                  "(roles: user): nothing to train on")):
        check_rows_file(path)
    listed = tmp_path / "rows.json"
    listed.write_text(json.dumps([json.loads(good), {"messages": [{"role": "assistant", "content": "x"}]}]))
    with pytest.raises(UserError, match=re.escape(f"{listed}: row 2: row with keys ['messages'] starts with an "
                                                  "assistant turn")):
        check_rows_file(listed)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(UserError, match="empty.jsonl holds no rows"):
        check_rows_file(tmp_path / "empty.jsonl")


def test_data_module_names_the_source_of_a_bad_row(tmp_path):
    from datasets import Dataset

    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": None}]
    Dataset.from_list(rows).to_parquet(tmp_path / "rows.parquet")
    module = InstructionDataModule(train=str(tmp_path / "rows.parquet"), tokenizer=str(quickstart.TOKENIZER_DIR))
    with pytest.raises(UserError, match=re.escape(f"{tmp_path / 'rows.parquet'}: row 2: row with keys ['prompt'] "
                                                  "is not an instruction row")):
        module.setup("fit")
    with pytest.raises(UserError, match="data.val: data file .*missing.jsonl does not exist"):
        InstructionDataModule(train=str(tmp_path / "rows.parquet"), val=str(tmp_path / "missing.jsonl"),
                              tokenizer=str(quickstart.TOKENIZER_DIR))


# --- chat templates and labels ----------------------------------------------------------------------------------

def test_resolve_chat_template():
    tokenizer = chatml_tokenizer()
    assert resolve_chat_template(tokenizer, "gemma") == CHAT_TEMPLATES["chatml"]  # the tokenizer's own wins
    tokenizer.chat_template = None
    assert resolve_chat_template(tokenizer, "gemma") == get_recipe("gemma").chat_template
    assert resolve_chat_template(tokenizer, "chatml") == CHAT_TEMPLATES["chatml"]
    assert resolve_chat_template(tokenizer, "{{ messages }}") == "{{ messages }}"
    with pytest.raises(ValueError, match="no chat template and no fallback.*chat_template="):
        resolve_chat_template(tokenizer, None)
    with pytest.raises(ValueError, match="no chat template"):
        tokenize_conversation(tokenizer, CONVERSATION)


def test_chatml_labels_are_the_assistant_turns_through_end_of_turn():
    tokenizer = chatml_tokenizer()
    example = tokenize_conversation(tokenizer, CONVERSATION)
    text = tokenizer.decode(example["input_ids"], skip_special_tokens=False)
    assert text == ("<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\nWhat colour is a blorp?<|im_end|>\n"
                    "<|im_start|>assistant\nA blorp is purple.<|im_end|>\n<|im_start|>user\n"
                    'Now write "rose" in capital letters.<|im_end|>\n<|im_start|>assistant\nROSE<|im_end|>\n')
    assert trained_runs(tokenizer, example) == ["A blorp is purple.<|im_end|>", "ROSE<|im_end|>"]
    assert tokenizer.decode(example["input_ids"][-1:]) == "\n"  # the untrained newline after the turn
    assert example["labels"][-1] == IGNORE_INDEX


def test_gemma_labels_are_the_model_turns_through_end_of_turn():
    tokenizer = gemma_tokenizer()
    with pytest.raises(Exception, match="System role not supported"):  # as Gemma's official template
        tokenize_conversation(tokenizer, CONVERSATION, chat_template="gemma")
    example = tokenize_conversation(tokenizer, fold_system(CONVERSATION), chat_template="gemma")
    text = tokenizer.decode(example["input_ids"], skip_special_tokens=False)
    # System merged into the first user turn (data.system: fold), `model` for the assistant, bos written by the template exactly once.
    assert text == ("<bos><start_of_turn>user\nAnswer briefly.\n\nWhat colour is a blorp?<end_of_turn>\n"
                    "<start_of_turn>model\nA blorp is purple.<end_of_turn>\n<start_of_turn>user\n"
                    'Now write "rose" in capital letters.<end_of_turn>\n<start_of_turn>model\nROSE<end_of_turn>\n')
    assert trained_runs(tokenizer, example) == ["A blorp is purple.<end_of_turn>", "ROSE<end_of_turn>"]
    assert example["labels"][-1] == IGNORE_INDEX
    prompt = tokenizer.apply_chat_template(fold_system(CONVERSATION[:2]), chat_template=get_recipe("gemma").chat_template,
                                           tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("What colour is a blorp?<end_of_turn>\n<start_of_turn>model\n")


def test_truncation_and_templates_that_rewrite_earlier_turns():
    tokenizer = chatml_tokenizer()
    assert len(tokenize_conversation(tokenizer, CONVERSATION, max_length=10)["input_ids"]) == 10
    tokenizer.chat_template = None
    counting = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="prefix by prefix"):
        tokenize_conversation(tokenizer, CONVERSATION, chat_template=counting)


def test_render_marks_the_trained_tokens_and_counts_them():
    tokenizer = chatml_tokenizer()
    shown = io.StringIO()
    text = render(tokenizer, {"messages": CONVERSATION}, file=shown)
    assert shown.getvalue() == text + "\n"
    example = tokenize_conversation(tokenizer, CONVERSATION)
    trained = sum(label != IGNORE_INDEX for label in example["labels"])
    assert trained == len(tokenizer("A blorp is purple.ROSE")["input_ids"]) + 2  # two end-of-turn tokens
    assert f"{trained} of {len(example['input_ids'])} tokens trained" in text
    assert "<|im_start|>assistant\n[[A blorp is purple.<|im_end|>]]\n<|im_start|>user" in text
    body, summary = text.rsplit("\n", 1)
    assert body.count("[[") == 2 and body.endswith("[[ROSE<|im_end|>]]\n")
    assert body.replace("[[", "").replace("]]", "") == tokenizer.apply_chat_template(CONVERSATION, tokenize=False)


# --- batches ----------------------------------------------------------------------------------------------------

def test_collate_pads_right_with_ignored_labels():
    examples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                {"input_ids": [8, 9, 10, 11, 12], "labels": [-100, -100, 10, 11, 12]}]
    batch = collate(examples, pad_token_id=0)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, -100], [-100, -100, 10, 11, 12]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_collate_packs_examples_with_restarting_positions():
    examples = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4, 5, 6, 7], "labels": [4, 5, 6, 7]},
                {"input_ids": [8, 9, 10, 11, 12], "labels": [8, 9, 10, 11, 12]}]
    batch = collate(examples, pad_token_id=0, packing=True, max_length=8)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention_mask: positions delimit examples
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3], [0, 1, 2, 3, 4, 0, 1]]
    # Example 2's first token is no target of example 1's last token; padding is not trained.
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, 5, 6, 7], [-100, 9, 10, 11, 12, -100, -100]]


def test_packed_row_computes_what_separate_examples_compute(model_folder):
    model = AutoModelForCausalLM.from_pretrained(model_folder).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # the random init is near-uniform; bigger weights make attention leaks visible
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    tokenizer = chatml_tokenizer()
    examples = [tokenize_conversation(tokenizer, part) for part in (CONVERSATION[:3], CONVERSATION[3:])]
    batch = collate(examples, pad_token_id=tokenizer.pad_token_id, packing=True, max_length=128)
    assert batch["input_ids"].shape[0] == 1
    with torch.no_grad():
        # No cache: transformers only reads packed sequences from position_ids when there is no past_key_values.
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        alone = [model(input_ids=torch.tensor([e["input_ids"]])).logits[0] for e in examples]
    torch.testing.assert_close(packed, torch.cat(alone), atol=1e-4, rtol=1e-4)


# --- the data module --------------------------------------------------------------------------------------------

def data_module(**overrides) -> InstructionDataModule:
    kwargs = dict(train=str(quickstart.TRAIN_FILE), val=str(quickstart.VAL_FILE), tokenizer=str(quickstart.TOKENIZER_DIR),
                  batch_size=4, max_length=64, limit=200)
    module = InstructionDataModule(**{**kwargs, **overrides})
    module.setup("fit")
    return module


def first_batches(loader, count: int = 3) -> list[list[list[int]]]:
    return [batch["input_ids"].tolist() for _, batch in zip(range(count), loader)]


def test_data_module_batches_from_the_quickstart_files():
    module = data_module()
    assert module.tokenizer.eos_token == "<|im_end|>" and module.pad_token_id == module.tokenizer.pad_token_id
    assert len(module.train_dataset) == 200 and len(module.val_dataset) == 200
    train, val = next(iter(module.train_dataloader())), next(iter(module.val_dataloader()))
    for batch in (train, val):
        assert set(batch) == {"input_ids", "attention_mask", "labels"} and batch["input_ids"].shape[0] == 4
        trained = batch["labels"] != IGNORE_INDEX
        assert trained.any(dim=1).all() and (batch["labels"][trained] == batch["input_ids"][trained]).all()
        assert (batch["attention_mask"][trained] == 1).all()
    assert first_batches(module.val_dataloader()) == first_batches(module.test_dataloader())  # not shuffled
    assert val["input_ids"][0].tolist()[:len(module.val_dataset[0]["input_ids"])] == module.val_dataset[0]["input_ids"]


def test_data_module_order_depends_only_on_the_seed():
    same = first_batches(data_module().train_dataloader()), first_batches(data_module().train_dataloader())
    assert same[0] == same[1]
    assert first_batches(data_module(seed=1).train_dataloader()) != same[0]


def test_lightning_sets_each_epochs_order_on_every_client_loader():
    """Lightning's own per-epoch call reaches the batch sampler, for one loader and for each client's, so epoch 1
    is drawn afresh (not a repeat of epoch 0) and a client that rejoins mid-run finds the order the others had."""
    from lightning.fabric.utilities.data import _set_sampler_epoch
    from lightning.pytorch.utilities import CombinedLoader

    module = data_module()
    loader = module.train_dataloader()
    first = first_batches(loader)
    _set_sampler_epoch(loader, 1)
    assert loader.batch_sampler.epoch == 1 and first_batches(loader) != first
    module.shard(2)
    combined = CombinedLoader(module.train_dataloader(), "max_size_cycle")
    for client_loader in combined.flattened:
        _set_sampler_epoch(client_loader, 3)
    assert [dl.batch_sampler.epoch for dl in combined.flattened] == [3, 3]


def test_data_module_holds_out_validation_and_packs():
    module = data_module(val=None, val_size=0.25, packing=True, batch_size=2)
    assert (len(module.train_dataset), len(module.val_dataset)) == (150, 50)
    loader = module.train_dataloader()
    batches = list(loader)
    assert len(batches) == len(loader)
    assert all(set(b) == {"input_ids", "labels", "position_ids"} and b["input_ids"].shape[1] <= 64 for b in batches)
    assert all(b["input_ids"].shape[0] == 2 for b in batches[:-1])
    # Every training example starts exactly once in the packed rows (position 0 on a non-pad token).
    starts = sum(int(((b["position_ids"] == 0) & (b["input_ids"] != module.pad_token_id)).sum()) for b in batches)
    assert starts == len(module.train_dataset)


# --- the quickstart ---------------------------------------------------------------------------------------------

def test_generator_reproduces_the_shipped_files(tmp_path):
    make_data.main(tmp_path)
    shipped = quickstart.DATA_DIR.parent
    files = ["data/train.jsonl", "data/val.jsonl", "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json",
             "tokenizer/chat_template.jinja"]
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == sorted(files)
    for name in files:
        assert (tmp_path / name).read_bytes() == (shipped / name).read_bytes(), name
    rows = (tmp_path / "data/train.jsonl").read_text().splitlines()
    assert len(rows) == make_data.TRAIN_ROWS and len((tmp_path / "data/val.jsonl").read_text().splitlines()) == 200
    assert not set(rows) & set((tmp_path / "data/val.jsonl").read_text().splitlines())


def test_quickstart_tokenizer_is_chatml_with_its_special_tokens():
    tokenizer = chatml_tokenizer()
    assert len(tokenizer) == make_data.VOCAB_SIZE
    assert (tokenizer.pad_token, tokenizer.eos_token, tokenizer.bos_token) == ("<|endoftext|>", "<|im_end|>", None)
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert tokenizer.apply_chat_template(CONVERSATION[1:3], tokenize=False, add_generation_prompt=False) == (
        "<|im_start|>user\nWhat colour is a blorp?<|im_end|>\n<|im_start|>assistant\nA blorp is purple.<|im_end|>\n")
    assert tokenizer.tokenize("40") == ["4", "0"]  # digits one by one


def test_model_dir_builds_once_a_loadable_model(model_folder, capsys, monkeypatch):
    assert model_folder.name == "quickstart-qwen2-v2" and (model_folder / "model.safetensors.index.json").is_file()
    assert len(list(model_folder.glob("model-*.safetensors"))) > 1  # sharded, as real checkpoints are
    assert not list(model_folder.parent.glob(".quickstart-qwen2-v2-*"))  # no temporary folder left
    model = AutoModelForCausalLM.from_pretrained(model_folder)
    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    assert model.config.model_type == "qwen2" and model.config.tie_word_embeddings
    assert model.config.vocab_size % 8 == 0 and model.config.vocab_size >= len(tokenizer)
    assert (model.config.eos_token_id, model.config.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
    stamp = (model_folder / "model.safetensors.index.json").stat().st_mtime_ns
    capsys.readouterr()
    monkeypatch.setenv("SPLITTRAIN_CACHE", str(model_folder.parent))
    assert quickstart.model_dir() == model_folder == quickstart.model_dir(model_folder.parent)
    assert "building" not in capsys.readouterr().err
    assert (model_folder / "model.safetensors.index.json").stat().st_mtime_ns == stamp
