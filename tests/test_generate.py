"""Split generation with a KV cache per segment equals transformers' ``generate``, in process and over TCP."""

from __future__ import annotations

import secrets
import threading

import pytest
import torch

from conftest import batch
from splittrain import split_model
from splittrain.cut import TrunkLink
from splittrain.generate import GenerationOptions, generate, left_pad
from splittrain.server import ServerLimits, TrunkServer
from splittrain.transport import fingerprint
from splittrain.transport.local import LocalTransport

NEW = 12


def parts_of(checkpoint, family: str, cuts=(1, 3), **overrides):
    model, folder = checkpoint(family, **overrides)
    return model, split_model(folder, cuts=cuts)


def hf_generate(model, ids, mask, **kwargs):
    kwargs.setdefault("eos_token_id", None)
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                          **kwargs)


@pytest.fixture
def tcp_trunk():
    """``tcp_trunk(trunk) -> (TrunkLink over loopback TCP, TrunkServer)``; servers stop when the test ends."""
    from splittrain.transport.tcp import TcpServer, TcpTransport

    started = []

    def make(trunk):
        token = secrets.token_hex(32)
        server = TrunkServer(trunk, total_steps=1)
        tcp = TcpServer(server, "127.0.0.1:0", {"alice": token})
        thread = threading.Thread(target=tcp.serve_forever, daemon=True)
        thread.start()
        started.append((tcp, thread))
        fp = fingerprint(trunk.config, trunk.family.name, (trunk.start, trunk.stop), trunk.dtype)
        return TrunkLink(TcpTransport(tcp.address, "alice", token, fp, timeout=30, reconnect_timeout=5)), server

    yield make
    for tcp, thread in started:
        tcp.stop()
        thread.join(timeout=10)
        assert not thread.is_alive()


@pytest.mark.parametrize("family", ["qwen2", "gemma", "gemma3", "gpt2"])
def test_greedy_equals_transformers_generate(checkpoint, family, tcp_trunk):
    """Left-padded prompts of different lengths; the trunk here, behind an in-process server and over TCP."""
    model, parts = parts_of(checkpoint, family)
    ids, mask = batch("left", length=11)
    if family == "gemma3":
        assert ids.shape[1] > model.config.sliding_window  # the prompt alone outgrows the sliding window
    expected = hf_generate(model, ids, mask)
    bottom, trunk, top = parts["bottom"], parts["trunk"], parts["top"]
    here = generate(bottom, trunk, top, ids, mask, max_new_tokens=NEW, pad_token_id=0, eos_token_id=[])
    assert torch.equal(here, expected)

    server = TrunkServer(trunk, total_steps=1)
    local = TrunkLink(LocalTransport(server, "alice"))
    assert torch.equal(generate(bottom, local, top, ids, mask, max_new_tokens=NEW, pad_token_id=0, eos_token_id=[]),
                       expected)
    link, remote = tcp_trunk(trunk)
    try:
        assert torch.equal(generate(bottom, link, top, ids, mask, max_new_tokens=NEW, pad_token_id=0,
                                    eos_token_id=[]), expected)
        assert remote.status()["sessions"]["alice"]["generations"] == 0  # freed when the generation ended
    finally:
        link.close()


def test_gemma3_long_prompt_through_sliding_layers_of_every_segment(checkpoint):
    """Every segment holds sliding layers (window 3) and the prompt is 5x the window."""
    model, parts = parts_of(checkpoint, "gemma3", cuts=(2, 4), sliding_window=3, num_hidden_layers=6,
                            layer_types=["sliding_attention", "full_attention"] * 3)
    ids, mask = batch("left", length=15)
    expected = hf_generate(model, ids, mask)
    got = generate(parts["bottom"], parts["trunk"], parts["top"], ids, mask, max_new_tokens=NEW, pad_token_id=0,
                   eos_token_id=[])
    assert torch.equal(got, expected)


def test_stop_tokens_min_new_tokens_and_repetition_penalty_as_transformers(checkpoint):
    model, parts = parts_of(checkpoint, "qwen2")
    ids, mask = batch("left", length=9)
    free = hf_generate(model, ids, mask)
    stop = int(free[0, 9 + 3])  # row 0 would say this 4th (or earlier): a stop token that ends it early
    for kwargs in (dict(eos_token_id=stop), dict(eos_token_id=stop, min_new_tokens=6),
                   dict(repetition_penalty=1.7), dict(eos_token_id=[stop, 5], repetition_penalty=0.8)):
        expected = hf_generate(model, ids, mask, **kwargs)
        eos = kwargs.pop("eos_token_id", [])
        got = generate(parts["bottom"], parts["trunk"], parts["top"], ids, mask, max_new_tokens=NEW, pad_token_id=0,
                       eos_token_id=eos, **kwargs)
        assert torch.equal(got, expected), kwargs
    ended = generate(parts["bottom"], parts["trunk"], parts["top"], ids, mask, max_new_tokens=NEW, pad_token_id=0,
                     eos_token_id=stop)
    first = 9 + free[0, 9:].tolist().index(stop)  # where row 0 says it first
    assert first <= 9 + 3 and ended[0, first] == stop and (ended[0, first + 1:] == 0).all()
    assert ended.shape[1] == free.shape[1] and (ended[1:] != 0).any()  # the other rows go on


def test_sampling_is_reproducible_and_top_k_1_is_greedy(checkpoint):
    _, parts = parts_of(checkpoint, "qwen2")
    ids, mask = batch("left", length=9)
    run = lambda **kw: generate(parts["bottom"], parts["trunk"], parts["top"], ids, mask, max_new_tokens=NEW,
                                pad_token_id=0, eos_token_id=[], **kw)
    greedy = run()
    sampled = run(do_sample=True, temperature=1.5, top_p=0.95, seed=7)
    assert torch.equal(sampled, run(do_sample=True, temperature=1.5, top_p=0.95, seed=7))
    assert not torch.equal(sampled, run(do_sample=True, temperature=1.5, top_p=0.95, seed=8))
    assert not torch.equal(sampled, greedy)
    assert torch.equal(run(do_sample=True, top_k=1, temperature=2.0, seed=3), greedy)


def test_one_position_crosses_per_token_and_the_server_frees_caches(checkpoint):
    _, parts = parts_of(checkpoint, "qwen2")
    server = TrunkServer(parts["trunk"], total_steps=1, limits=ServerLimits(generation_timeout=60))
    link = TrunkLink(LocalTransport(server, "alice"))
    crossed = []
    original = link.generate

    def counting(*args):
        before = link.positions_sent
        out = original(*args)
        crossed.append(link.positions_sent - before)
        return out

    link.generate = counting
    ids, mask = batch("left", length=9)
    generate(parts["bottom"], link, parts["top"], ids, mask, max_new_tokens=NEW, pad_token_id=0, eos_token_id=[])
    assert crossed == [9] + [1] * (NEW - 1)  # the prompt once, then one position per new token
    assert server.status()["sessions"]["alice"]["generations"] == 0

    # an abandoned generation (the client died mid-way) is freed after generation_timeout, and with its session
    from splittrain.generate import RemoteTrunk

    state = parts["bottom"](ids, attention_mask=mask)
    RemoteTrunk(link)(state.hidden_states, mask, state.position_ids)
    sessions = server.status()["sessions"]
    assert sessions["alice"]["generations"] == 1 and sessions["alice"]["generation_bytes"] > 0
    server.expire(now=server.sessions["alice"].generations[next(iter(server.sessions["alice"].generations))].used + 61)
    assert server.status()["sessions"]["alice"]["generations"] == 0
    assert server.status()["counters"]["generations_expired"] == 1
    RemoteTrunk(link)(state.hidden_states, mask, state.position_ids)
    server.end_session("alice")
    assert "alice" not in server.status()["sessions"]
    with pytest.raises(RuntimeError, match="unknown to the trunk server"):
        link.generate("f" * 32, False, state.hidden_states[:, -1:], mask[:, -1:], state.position_ids[:, -1:])


def test_the_server_bounds_generations(checkpoint):
    _, parts = parts_of(checkpoint, "qwen2")
    server = TrunkServer(parts["trunk"], total_steps=1, limits=ServerLimits(max_generations=2))
    link = TrunkLink(LocalTransport(server, "alice"))
    ids, mask = batch(None, length=6)
    state = parts["bottom"](ids, attention_mask=mask)
    for gid in ("a", "b", "c"):
        link.generate(gid, True, state.hidden_states, mask, state.position_ids)
    assert list(server.sessions["alice"].generations) == ["b", "c"]  # the oldest went
    assert server.status()["counters"]["generations_evicted"] == 1
    tight = TrunkServer(parts["trunk"], total_steps=1, limits=ServerLimits(max_generation_bytes=1000))
    with pytest.raises(ValueError, match="KV caches would hold more than 1000 bytes"):
        TrunkLink(LocalTransport(tight, "bob")).generate("a", True, state.hidden_states, mask, state.position_ids)
    assert tight.status()["sessions"]["bob"]["generations"] == 0


def test_bad_options_and_prompts_are_refused(checkpoint):
    _, parts = parts_of(checkpoint, "qwen2")
    ids, mask = batch("right", length=6)
    with pytest.raises(ValueError, match="pad prompts on the left"):
        generate(parts["bottom"], parts["trunk"], parts["top"], ids, mask)
    with pytest.raises(TypeError, match="unknown generation option.*'top_q'"):
        GenerationOptions.of(top_q=0.5)
    for bad, match in ((dict(temperature=0), "temperature"), (dict(top_p=1.5), "top_p"),
                       (dict(max_new_tokens=0), "max_new_tokens"), (dict(top_k=0), "top_k"),
                       (dict(min_new_tokens=9, max_new_tokens=4), "min_new_tokens")):
        with pytest.raises(ValueError, match=match):
            GenerationOptions(**bad)
    with pytest.raises(ValueError, match="stop_strings need the tokenizer"):
        generate(parts["bottom"], parts["trunk"], parts["top"], *left_pad([[1, 2]], 0), stop_strings=["x"])
    with pytest.raises(TypeError, match="Segment or a TrunkLink"):
        generate(parts["bottom"], object(), parts["top"], *left_pad([[1, 2]], 0))


# ------------------------------------------------------------------------------------------ commands
def _fit(run, *extra: str):
    from splittrain.cli import main

    return main(["fit", "--config", "configs/quickstart.yaml", "--trainer.default_root_dir", str(run),
                 "--trainer.max_steps", "30", "--trainer.val_check_interval", "30", "--trainer.limit_val_batches", "2",
                 "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                 "--trainer.callbacks.init_args.every_n_train_steps", "30", "--data.limit", "400",
                 "--model.sample_prompt", "null", *extra])


def test_test_command_scores_generated_answers(tmp_path, capsys):
    """References equal to what the trained model answers score 1.0; one changed reference scores below."""
    import json

    from splittrain.cli import main

    run = tmp_path / "run"
    _fit(run, "--model.eval_generate", "true", "--model.eval_max_rows", "6",
         "--model.generation.max_new_tokens", "6", "--model.generation.min_new_tokens", "2")
    summary = json.loads((run / "summary.json").read_text())
    evaluated = json.loads((run / "eval.json").read_text())
    assert evaluated["metrics"]["rows"] == 6 and len(evaluated["rows"]) == 6
    assert summary["test_exact_match"] == pytest.approx(evaluated["metrics"]["exact_match"])
    assert 0 < summary["test_token_accuracy"] < 1 and summary["test_perplexity"] > 1
    assert "| exact_match |" in (run / "eval.md").read_text()
    answers = [row["generated"] for row in evaluated["rows"]]
    assert all(a.strip() for a in answers)  # min_new_tokens: something to score

    rows = [{"messages": [*row["messages"], {"role": "assistant", "content": row["generated"]}]}
            for row in evaluated["rows"]]
    (tmp_path / "fixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rows[2]["messages"][-1]["content"] = "something else entirely"
    (tmp_path / "changed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    scores = {}
    for name in ("fixed", "changed"):  # the run's own folder: the trunk server finds its checkpoint there
        main(["test", "--config", str(run / "config.yaml"), "--ckpt_path", "last",
              "--data.test", str(tmp_path / f"{name}.jsonl")])
        written = json.loads((run / "eval.json").read_text())
        scores[name] = written["metrics"]
        assert [r["generated"] for r in written["rows"]] == answers
    assert scores["fixed"]["exact_match"] == scores["fixed"]["rouge_l"] == scores["fixed"]["bleu"] == 1.0
    assert scores["changed"]["exact_match"] == pytest.approx(5 / 6)
    assert scores["changed"]["rouge_l"] < 1.0 and scores["changed"]["bleu"] < 1.0
    assert "exact match 1.000" in capsys.readouterr().out

    # generate: one prompt streams; a prompts file gives the same answers as the evaluation
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in rows))
    got = main(["generate", "--config", str(run / "config.yaml"), "--ckpt_path", "last", "--prompts",
                str(tmp_path / "prompts.jsonl"), "--out", str(tmp_path / "answers.jsonl"), "--batch_size", "4"])
    assert got == answers
    assert [json.loads(line)["answer"] for line in (tmp_path / "answers.jsonl").read_text().splitlines()] == answers
    capsys.readouterr()
    single = main(["generate", "--config", str(run / "config.yaml"), "--ckpt_path", "last",
                   "--prompt", rows[0]["messages"][-2]["content"]])
    assert single[0] and single[0] in capsys.readouterr().out  # streamed as it was generated


@pytest.mark.slow
def test_the_quickstart_answers_half_its_held_out_rows(tmp_path, capsys):
    """The README's first command, as is (under 3 minutes on 2 cores): the printed exact match is >= 0.5."""
    import json

    from splittrain.cli import main

    run = tmp_path / "quickstart"
    main(["fit", "--config", "configs/quickstart.yaml", "--trainer.default_root_dir", str(run),
          "--trainer.enable_progress_bar", "false"])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test_exact_match"] >= 0.5 and summary["test_rouge_l"] >= 0.5
    rows = json.loads((run / "eval.json").read_text())["rows"]
    assert len(rows) == 200 and sum(r["exact"] for r in rows) / 200 == pytest.approx(summary["test_exact_match"])
    out = capsys.readouterr().out
    assert f"exact match {summary['test_exact_match']:.3f}" in out
    assert "assistant: nomel" in out  # the sample answer: 'Reverse the word "lemon".'


def test_generation_runs_every_lora_layer_in_eval_mode(checkpoint):
    """The server switches its trunk between training and eval only when the mode changes (a walk over every
    module costs 1.7 ms per decode step on a 100M trunk with LoRA). peft makes LoRA layers in training mode: those
    of the trunk as loaded and those of a client that comes later take the trunk's mode, so no generation has
    dropout. Every client's tokens equal those of a trunk without dropout (both adapters start from the same
    tensors); the server trains in between and generates again in eval mode."""
    from splittrain.lora import LoraSettings
    from splittrain.server import load_trunk

    _, folder = checkpoint("qwen2")
    parts = split_model(folder, cuts=(1, 3))
    ids, mask = batch("left", length=11)

    def server_of(dropout: float) -> TrunkServer:
        trunk = load_trunk(str(folder), (1, 3), LoraSettings(r=4, alpha=8, dropout=dropout), seed=1)
        with torch.no_grad():  # a LoRA update large enough for its dropout to change tokens
            for name, p in trunk.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
        return TrunkServer(trunk, total_steps=1)

    def tokens(server: TrunkServer, client: str) -> torch.Tensor:
        link = TrunkLink(LocalTransport(server, client))
        return generate(parts["bottom"], link, parts["top"], ids, mask, max_new_tokens=NEW, pad_token_id=0,
                        eos_token_id=[])

    expected = tokens(server_of(0.0), "alice")
    server = server_of(0.5)
    assert torch.equal(tokens(server, "alice"), expected)
    assert torch.equal(tokens(server, "bob"), expected)  # bob's LoRA layers were added just now
    assert not any(m.training for m in server.trunk.modules())
    server.trunk.switch_mode(True)  # as a training forward does
    assert all(m.training for m in server.trunk.modules())
    assert torch.equal(tokens(server, "bob"), expected)
