"""A CPU top gives glibc's freed heap pages back around its chunked loss when a chunk's logits are large: before them
(the step's largest tensor, which would otherwise stack on the freed activations of the layers before it) and after
them, before the backward pass. Nothing else changes. A trunk server's threads share two glibc heaps."""

from __future__ import annotations

import pytest
import torch

import splittrain
from splittrain import loading, segments
from conftest import VOCAB, tiny_model
from test_chunked_loss import inputs


@pytest.mark.parametrize("large", [True, False])
def test_a_cpu_top_trims_the_heap_around_a_chunked_loss_of_large_logits(monkeypatch, large):
    """Chunks of 7 x 96 logits: trimmed when the threshold is below their size, not at the default (32 MiB, which
    spares small models the trim's cost); never on the plain path or in generation."""
    model = tiny_model("qwen2")
    bottom, trunk, top = splittrain.split_model(model, cuts=(1, 3))
    ids, mask, labels = inputs(model)
    calls = []
    monkeypatch.setattr(segments, "release_freed_memory", lambda: calls.append(len(calls)))
    if large:
        monkeypatch.setattr(segments, "TRIM_LOGITS_BYTES", 7 * VOCAB * 4)
    losses = {}
    for chunk in (0, 7):
        top.loss_chunk = chunk
        calls.clear()
        losses[chunk] = top(trunk(bottom(ids, attention_mask=mask)), labels=labels).loss
        assert len(calls) == (2 if chunk and large else 0), chunk
    torch.testing.assert_close(losses[7], losses[0], rtol=1e-6, atol=0)
    calls.clear()
    with torch.no_grad():  # generation: logits, no loss, no trim
        top(trunk(bottom(ids, attention_mask=mask)), logits_to_keep=1)
    assert not calls


def test_release_freed_memory_is_still_loadings():
    """Loading (and the federated clients, which import it from there) trims with the same function."""
    assert loading.release_freed_memory is segments.release_freed_memory
    segments.release_freed_memory()  # a no-op where the C library has no malloc_trim


def test_a_trunk_server_shares_two_heaps_among_its_threads(monkeypatch, tmp_path):
    """serve limits glibc's heaps once its arguments are checked, before the model loads and its threads start (its
    compute is serialized; a heap per connection thread only held more free bytes as clients came and went), unless
    MALLOC_ARENA_MAX says otherwise."""
    import json
    import os
    import re
    import subprocess
    import sys

    from splittrain import cli
    from splittrain.cli import SERVER_HEAP_ARENAS, main
    from splittrain.errors import UserError

    calls = []
    monkeypatch.setattr(segments, "_glibc", lambda name: (lambda *args: calls.append(args) or 1)
                        if name == "mallopt" else None)
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert segments.limit_heap_arenas(2) and calls == [(segments.M_ARENA_MAX, 2)]
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert not segments.limit_heap_arenas(2) and len(calls) == 1
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    calls.clear()
    with pytest.raises(UserError, match="tokens file .* does not exist"):  # a mistake changes nothing
        main(["serve", "--config", "configs/quickstart.yaml", "--tokens", str(tmp_path / "missing.json")])
    assert not calls
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"alice": "a" * 32}))
    tokens.chmod(0o600)

    def loading(*args):  # the limit is set before the model loads
        raise RuntimeError(f"loading after {calls}")

    monkeypatch.setattr(cli, "_trunk_server", loading)
    with pytest.raises(RuntimeError, match=re.escape(f"loading after {[(segments.M_ARENA_MAX, SERVER_HEAP_ARENAS)]}")):
        main(["serve", "--config", "configs/quickstart.yaml", "--tokens", str(tokens), "--address", "127.0.0.1:0"])
    # glibc takes the setting (mallopt answers 1), in a process of its own
    done = subprocess.run([sys.executable, "-c", "from splittrain.segments import limit_heap_arenas as l; "
                           "print(l(2))"], capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"})
    assert done.stdout.strip() == ("True" if sys.platform.startswith("linux") else "False"), done.stderr[-500:]
