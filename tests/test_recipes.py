"""Recipes: fallback chat templates render as the official instruct templates; architecture numbers build configs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from recipes import chat_template_for, get_recipe, pad_token_id, stop_token_ids
from splittrain.data import IGNORE_INDEX, fold_system, resolve_chat_template, template_trims, tokenize_conversation

SYSTEM = {"role": "system", "content": "You are terse."}
TURNS = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
         {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]

# Written from the model cards' documented formats (not read from any tokenizer file).
EXPECTED = {
    "qwen2": ("<|im_start|>system\nYou are terse.<|im_end|>\n"
              "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
              "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"),
    "gemma3": ("<bos><start_of_turn>user\nYou are terse.\n\nHi there<end_of_turn>\n"
               "<start_of_turn>model\nHello!<end_of_turn>\n"
               "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>\n"),
}
SPECIALS = {"qwen2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            "gemma": ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
            "gemma3": ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]}


def tokenizer_for(family: str, template: str | None = None):
    """A small byte-level BPE with the family's special tokens (and no chat template unless given)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = SPECIALS[family]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(["Hi there Hello! What is 2+2? 4 You are terse. system user assistant model"],
                            trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if family == "qwen2":
        kwargs = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>")
    else:
        kwargs = dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, **kwargs,
                                        extra_special_tokens=[t for t in specials if t not in kwargs.values()])
    tokenizer.chat_template = template
    return tokenizer


def render(family: str, messages, **kwargs) -> str:
    tokenizer = tokenizer_for(family)
    return tokenizer.apply_chat_template(messages, chat_template=chat_template_for(tokenizer, family),
                                         tokenize=False, **kwargs)


def test_qwen2_renders_chatml_with_its_default_system_prompt():
    assert render("qwen2", [SYSTEM, *TURNS]) == EXPECTED["qwen2"]
    default = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    assert render("qwen2", TURNS) == default + EXPECTED["qwen2"].split("<|im_end|>\n", 1)[1]
    assert render("qwen2", TURNS[:1], add_generation_prompt=True) == (
        default + "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")


def test_gemma_has_no_system_role_and_alternates_turns():
    with pytest.raises(Exception, match="System role not supported"):
        render("gemma", [SYSTEM, *TURNS])
    assert render("gemma", TURNS) == EXPECTED["gemma3"].replace("You are terse.\n\n", "")
    assert render("gemma", [{"role": "user", "content": "  Hi there \n"}], add_generation_prompt=True) == (
        "<bos><start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n")  # contents are trimmed
    with pytest.raises(Exception, match="must alternate"):
        render("gemma", [TURNS[0], TURNS[0]])


def test_gemma3_folds_the_system_message_into_the_first_user_turn():
    assert render("gemma3", [SYSTEM, *TURNS]) == EXPECTED["gemma3"]
    parts = [{"role": "system", "content": [{"type": "text", "text": "You are terse."}]},
             {"role": "user", "content": [{"type": "text", "text": "Hi there"}]}, *TURNS[1:]]
    assert render("gemma3", parts) == EXPECTED["gemma3"]
    assert render("gemma3", TURNS) == EXPECTED["gemma3"].replace("You are terse.\n\n", "")


# The official instruct templates, for comparison only (not part of the repository, and never read unless asked):
# SPLITTRAIN_HF_REAL names a folder with the models' files you downloaded; without it these tests are skipped, and
# test_data_module_folds_as_gemma3s_template_trims checks the rendering on its own.
HF_REAL = Path(os.environ["SPLITTRAIN_HF_REAL"]) if os.environ.get("SPLITTRAIN_HF_REAL") else None
OFFICIAL = {"qwen2": "Qwen2-1.5B-Instruct/chat_template.jinja", "gemma": "gemma-2b-it/tokenizer_config.json",
            "gemma3": "gemma-3-4b-it/chat_template.json"}
# Whitespace around every kind of turn: Gemma's and Gemma-3's templates trim each turn's content (Gemma-3 not the
# system text it prefixes to the first user turn), Qwen2's trims nothing.
SPACED = [
    [{"role": "system", "content": "Answer tersely.  "}, {"role": "user", "content": "  Capital of Peru?  \n"},
     {"role": "assistant", "content": " Lima.\n"}],
    [{"role": "system", "content": "Answer tersely.\n"}, {"role": "user", "content": "\tCapital of Peru?"},
     {"role": "assistant", "content": "Lima. "}, {"role": "user", "content": " And Chile? "},
     {"role": "assistant", "content": "\nSantiago"}],
    [{"role": "user", "content": "  Capital of Peru?  \n"}, {"role": "assistant", "content": " Lima.\n"}],
]


def official_template(family: str) -> str:
    if HF_REAL is None:
        pytest.skip("SPLITTRAIN_HF_REAL names no folder of the official templates")
    path = HF_REAL / OFFICIAL[family]
    if not path.is_file():
        pytest.skip(f"the official {family} template is not here ({path})")
    return json.loads(path.read_text())["chat_template"] if path.suffix == ".json" else path.read_text()


@pytest.mark.parametrize("family", ["qwen2", "gemma", "gemma3"])
@pytest.mark.parametrize("case", range(len(SPACED)))
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_fallback_and_fold_render_whitespace_as_the_official_template(family, case, generation_prompt):
    """The recipe's fallback renders as the official template, whitespace included, and so does a conversation
    folded by ``data.system: fold``; for Gemma-3, whose official template takes a system message, the folded
    conversation renders as the unfolded one does."""
    tokenizer, official = tokenizer_for(family), official_template(family)
    ours = get_recipe(family).chat_template
    trims = template_trims(tokenizer, official)
    assert trims == (family != "qwen2") == template_trims(tokenizer, ours)
    messages = SPACED[case][:-1] if generation_prompt else SPACED[case]
    folded = fold_system(messages, trim=trims)

    def rendered(conversation, template):
        return tokenizer.apply_chat_template(conversation, chat_template=template, tokenize=False,
                                             add_generation_prompt=generation_prompt)

    for conversation in ([folded] if family == "gemma" else [messages, folded]):  # Gemma refuses a system turn
        assert rendered(conversation, ours) == rendered(conversation, official)
    if family == "gemma3":
        assert rendered(folded, official) == rendered(messages, official)
    if family != "qwen2" and messages[0]["role"] == "system":
        assert "\n\nCapital of Peru?" in rendered(folded, official)  # the user's text trimmed, not "\n\n  Capital"


def test_data_module_folds_as_gemma3s_template_trims(tmp_path):
    """``data.system: fold`` with the Gemma-3 recipe: the training text and the evaluation prompt have the user's text
    trimmed, as Gemma-3's template trims it when it folds the system message itself."""
    from splittrain.data import InstructionDataModule

    tokenizer = tokenizer_for("gemma3")
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"messages": SPACED[0]}) + "\n")
    module = InstructionDataModule(train=str(rows), val=str(rows), tokenizer=str(tmp_path / "tokenizer"),
                                   chat_template="gemma3", system="fold")
    module.setup("fit")
    text = module.tokenizer.decode(module.train_dataset[0]["input_ids"])
    assert text == tokenizer.apply_chat_template(SPACED[0], chat_template=get_recipe("gemma3").chat_template,
                                                 tokenize=False)
    assert "Answer tersely.  \n\nCapital of Peru?<end_of_turn>" in text
    assert module.eval_rows("val")[0]["messages"] == [{"role": "user",
                                                       "content": "Answer tersely.  \n\nCapital of Peru?"}]


@pytest.mark.parametrize("family", ["qwen2", "gemma", "gemma3"])
def test_trained_positions_are_the_assistant_turns_and_their_end_of_turn(family):
    recipe = get_recipe(family)
    tokenizer = tokenizer_for(family)
    messages = TURNS if family == "gemma" else [SYSTEM, *TURNS]
    example = tokenize_conversation(tokenizer, messages, chat_template=family)
    trained = [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]
    assert tokenizer.decode(trained) == f"Hello!{recipe.end_of_turn}4{recipe.end_of_turn}"
    assert [label for label in example["labels"] if label != IGNORE_INDEX] == trained


def test_a_tokenizers_own_template_wins():
    own = "{% for m in messages %}{{ m['content'] }}|{% endfor %}"
    tokenizer = tokenizer_for("gemma3", template=own)
    assert chat_template_for(tokenizer, "gemma3") == own
    assert resolve_chat_template(tokenizer, "gemma3") == own
    assert resolve_chat_template(tokenizer_for("gemma3"), "gemma3") == get_recipe("gemma3").chat_template


def test_stop_and_pad_tokens():
    qwen = tokenizer_for("qwen2")
    assert stop_token_ids(qwen, "qwen2") == [qwen.convert_tokens_to_ids("<|im_end|>")]  # EOS is the end of turn
    gemma = tokenizer_for("gemma")
    assert stop_token_ids(gemma, "gemma") == [gemma.eos_token_id, gemma.convert_tokens_to_ids("<end_of_turn>")]
    gemma.pad_token = None
    assert pad_token_id(gemma) == gemma.eos_token_id  # the pad token falls back to EOS


def test_unknown_recipe_and_size_are_named():
    with pytest.raises(ValueError, match="unknown recipe 'llama3'; recipes: gemma, gemma3, qwen2"):
        get_recipe("llama3")
    with pytest.raises(ValueError, match="has no size '13b'; sizes: 2b, 7b"):
        get_recipe("gemma").size("13b")


# Published architecture numbers (model cards / technical reports), per (recipe, size):
# layers, hidden, heads, kv heads, head dim, intermediate, vocab, sliding window (None: full attention only)
PUBLISHED = {
    ("gemma", "2b"): (18, 2048, 8, 1, 256, 16384, 256000, None),
    ("gemma", "7b"): (28, 3072, 16, 16, 256, 24576, 256000, None),
    ("gemma3", "4b"): (34, 2560, 8, 4, 256, 10240, 262208, 1024),
    ("qwen2", "1.5b"): (28, 1536, 12, 2, 128, 8960, 151936, None),
    ("qwen2", "7b"): (28, 3584, 28, 4, 128, 18944, 152064, None),
}


@pytest.mark.parametrize("recipe,size", sorted(PUBLISHED))
def test_architecture_numbers_build_the_real_config(recipe, size):
    """transformers' config class built from the recipe's numbers has the published shape, and a one-layer model
    of it has the published tensor shapes (meta device: nothing allocated)."""
    from transformers import AutoModelForCausalLM

    spec = get_recipe(recipe).size(size)
    config = spec.config()
    layers, hidden, heads, kv, head_dim, inter, vocab, window = PUBLISHED[(recipe, size)]
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
            config.head_dim, config.intermediate_size, config.vocab_size) == (layers, hidden, heads, kv, head_dim,
                                                                              inter, vocab)
    types = getattr(config, "layer_types", None) or ["full_attention"] * layers
    if window is None:
        assert set(types) == {"full_attention"}
    else:  # Gemma-3: five sliding layers, then a global one
        assert config.sliding_window == window and types[:6] == ["sliding_attention"] * 5 + ["full_attention"]
        assert types.count("full_attention") == layers // 6
    for cuts in spec.cuts.values():
        assert 0 < cuts.cuts[0] < cuts.cuts[1] < layers and cuts.why
    config.num_hidden_layers = 1
    if hasattr(config, "layer_types"):
        config.layer_types = config.layer_types[:1]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    attention = model.model.layers[0].self_attn
    assert attention.q_proj.weight.shape == (heads * head_dim, hidden)
    assert attention.k_proj.weight.shape == (kv * head_dim, hidden)
    assert model.model.layers[0].mlp.up_proj.weight.shape == (inter, hidden)
    assert model.model.embed_tokens.weight.shape == (vocab, hidden)


def test_generation_stops_at_the_end_of_turn_token_by_default():
    from splittrain.generate import GenerationOptions, _stop_ids

    gemma = tokenizer_for("gemma")
    assert _stop_ids(GenerationOptions(), gemma) == stop_token_ids(gemma, "gemma")
    assert _stop_ids(GenerationOptions(eos_token_id=[7]), gemma) == [7]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2", "gemma", "gemma3"])
def test_tiny_config_fits_then_tests(family, tmp_path, monkeypatch):
    """configs/<family>/tiny.yaml as its first lines say: fit, then test from the last checkpoint."""
    import json
    from pathlib import Path

    from splittrain.cli import main

    config = str(Path(__file__).resolve().parents[1] / "configs" / family / "tiny.yaml")
    monkeypatch.chdir(tmp_path)  # the config's run folder, runs/<family>-tiny, lands here
    main(["fit", "--config", config, "--trainer.enable_progress_bar", "false"])
    run = tmp_path / "runs" / f"{family}-tiny"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["train_loss_last"] < summary["train_loss_first"]
    (run / "eval.json").unlink(missing_ok=True)
    main(["test", "--config", config, "--ckpt_path", "last", "--trainer.enable_progress_bar", "false"])
    evaluated = json.loads((run / "eval.json").read_text())
    assert evaluated["metrics"]["rows"] == 16 and {"exact_match", "rouge_l", "bleu", "test_perplexity"} <= set(
        evaluated["metrics"])
    model_config = json.loads((Path(json.loads((run / "run.json").read_text())["model"]) / "config.json").read_text())
    assert model_config["model_type"] == get_recipe(family).sizes[min(get_recipe(family).sizes)].model_type


REAL_CONFIGS = ["gemma/2b_lora", "gemma/7b_lora", "gemma3/4b_it_lora", "qwen2/1.5b_lora", "qwen2/7b_lora"]


@pytest.mark.parametrize("name", REAL_CONFIGS)
def test_real_size_configs_print_and_estimate_without_downloading(name, capsys, monkeypatch):
    from pathlib import Path

    from splittrain.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a download attempt fails
    config = str(Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml")
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", config, "--print_config"])
    assert exit_.value.code in (0, None) and "model:" in capsys.readouterr().out
    text = Path(config).read_text()
    assert text.startswith("# ") and "splittrain fit --config" in text and "torchrun" in text and "serve" in text
    estimate = main(["estimate", "--config", config])
    family, size = name.split("/")
    spec = get_recipe(family).size(size.split("_")[0])
    layers = spec.architecture["num_hidden_layers"]
    assert len(estimate["client"]["layers"]) + len(estimate["server"]["layers"]) == layers
    assert estimate["server"]["weights"] == 2 * estimate["server"]["parameters"]  # bfloat16
    # the client's projections are 4- or 8-bit, its embedding, norms and head bfloat16
    assert 0.5 * estimate["client"]["parameters"] < estimate["client"]["weights"] < 2 * estimate["client"]["parameters"]
    assert estimate["client"]["total"] <= 1.5 * estimate["server"]["total"]
    for party in ("client", "server"):
        assert 0 < estimate[party]["trainable"] < estimate[party]["parameters"] / 50  # LoRA
    assert "client" in capsys.readouterr().out


def test_estimate_counts_exactly_the_parameters_each_party_loads(checkpoint):
    from splittrain import split_model
    from splittrain.estimate import estimate_memory

    for family in ("qwen2", "gemma"):
        _, folder = checkpoint(family)
        parts = split_model(folder, cuts=(1, 3))
        estimate = estimate_memory(str(folder), (1, 3), 2, 16, client="full", trunk_lora_r=4)
        client = {id(p): p for part in ("bottom", "top") for p in parts[part].parameters()}  # a tied head once
        assert estimate["client"].parameters == sum(
            p.numel() for p in client.values())
        assert estimate["server"].parameters == sum(p.numel() for p in parts["trunk"].parameters())
        assert estimate["client"].trainable == estimate["client"].parameters
        assert estimate["client"].optimizer == 2 * estimate["client"].weights  # AdamW's two moments
    with pytest.raises(ValueError, match="cuts \\[3, 1\\] must satisfy"):
        estimate_memory(str(folder), (3, 1), 2, 16)


def test_model_recipe_sets_lora_targets_and_checks_the_family(checkpoint):
    from splittrain.modules import ClientModule

    _, folder = checkpoint("qwen2")
    module = ClientModule(model=str(folder), cuts=(1, 3), recipe="qwen2")
    assert module.client_lora.targets == module.trunk_settings.lora.targets == list(get_recipe("qwen2").lora_targets)
    module.configure_model()  # a qwen2 model: accepted
    with pytest.raises(ValueError, match="model.recipe is 'gemma' but .* is a 'qwen2' model"):
        ClientModule(model=str(folder), cuts=(1, 3), recipe="gemma").configure_model()
