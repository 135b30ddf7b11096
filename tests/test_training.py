"""Split LoRA training equals monolithic peft training of the unsplit transformers model (fp32)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from splittrain.lora import LoraSettings, adapter_state_dict, init_lora, lora_config, model_family
from splittrain.modules import ClientModule, TrunkSettings
from splittrain.optim import OptimSettings, build_optimizer
from conftest import batch
from processes import needs_openssl, self_signed

CUTS = (1, 3)
STEPS = 5
LORA = LoraSettings(r=4, alpha=8)
OPTIM = OptimSettings(lr=2e-2, weight_decay=0.01, schedule="linear", warmup_steps=2)


def batches(count: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(count):
        ids, mask = batch("right" if i % 2 else "left", batch_size=2, length=9, seed=10 + i % 2)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return out


def trainer(tmp_path, accumulate: int = 1, clip: float | None = None, **kwargs) -> L.Trainer:
    return L.Trainer(max_steps=STEPS, accumulate_grad_batches=accumulate, gradient_clip_val=clip, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=tmp_path, accelerator="cpu",
                     **kwargs)


def split_run(folder, tmp_path, client: str, accumulate: int = 1, clip: float | None = None, server=None,
              **options):
    """Split training through ClientModule; the trunk in this process, or ``server``'s (a TrunkServer behind
    the transport that ``options`` name)."""
    module = ClientModule(model=str(folder), cuts=CUTS, client=client, client_lora=LORA, optim=OPTIM,
                          trunk=TrunkSettings(lora=LORA, optim=OPTIM), seed=3, **options)
    data = DataLoader(batches(STEPS * accumulate), batch_size=None)
    trainer(tmp_path, accumulate, clip).fit(module, train_dataloaders=data)
    weights = {**module.client_adapters(), **adapter_state_dict((server or module.server).trunk)}
    if client == "full":
        weights.update({k: v for s in (module.bottom, module.top) for k, v in s.state_dict().items()})
    return module, weights


def peft_model(folder, client: str):
    """The unsplit model with peft adapters on the layers the split trains (the trunk's, and the client's for
    ``lora``); with ``full`` the client's layers train in full. Returns (model, family)."""
    from peft import inject_adapter_in_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    family = model_family(model)
    lora_layers = range(model.config.num_hidden_layers) if client == "lora" else range(*CUTS)
    for p in model.parameters():
        p.requires_grad_(False)
    inject_adapter_in_model(lora_config(family, lora_layers, LORA), model)
    init_lora(model, seed=3)
    if client == "full":
        for name, p in model.named_parameters():
            if ".lora_" not in name and layer_of(name, family.layer_path) not in range(*CUTS):
                p.requires_grad_(True)
    return model, family


def monolithic_run(folder, client: str, accumulate: int = 1, clip: float | None = None):
    """The reference: the unsplit model with peft adapters on the same layers, one AdamW, a plain loop."""
    model, family = peft_model(folder, client)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = build_optimizer(params, OPTIM, STEPS)
    model.train()
    losses, data = [], iter(batches(STEPS * accumulate))
    for _ in range(STEPS):
        for _ in range(accumulate):
            loss = model(**next(data)).loss
            losses.append(loss.item())
            (loss / accumulate).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    weights = adapter_state_dict(model)
    if client == "full":
        state = model.state_dict()
        weights.update({k: state[k] for k in state if ".lora_" not in k
                        and layer_of(k, family.layer_path) not in range(*CUTS)})
    return losses, weights


def layer_of(name: str, layer_path: str) -> int | None:
    """Decoder-layer index of a parameter name (``model.layers.3...`` -> 3), None outside the layers."""
    if not name.startswith(layer_path + "."):
        return None
    return int(name[len(layer_path) + 1:].split(".")[0])


def assert_same(split_losses, split_weights, mono_losses, mono_weights):
    assert len(split_losses) == len(mono_losses)
    for i, (a, b) in enumerate(zip(split_losses, mono_losses)):
        assert abs(a - b) <= 1e-5 * abs(b), f"micro-batch {i}: split loss {a} vs monolithic {b}"
    last_on_first_batch = max(i for i in range(len(mono_losses)) if i % 2 == 0)
    assert mono_losses[last_on_first_batch] < mono_losses[0] - 0.05  # the run really trains
    common = set(split_weights) & set(mono_weights)
    assert common == set(split_weights)
    assert set(mono_weights) - common <= {"lm_head.weight"}  # a tied head is the embedding in segments
    for key in sorted(common):
        diff = (split_weights[key] - mono_weights[key]).abs().max().item()
        assert diff <= 1e-5, f"{key}: max abs diff {diff}"


@pytest.mark.parametrize("family", ["qwen2", "gemma", "gemma3"])
@pytest.mark.parametrize("client", ["lora", "full"])
def test_split_training_equals_monolithic_peft(checkpoint, tmp_path, family, client):
    _, folder = checkpoint(family)
    module, weights = split_run(folder, tmp_path, client)
    assert module.server.steps == STEPS
    losses, mono = monolithic_run(folder, client)
    assert_same(module._stats["losses"], weights, losses, mono)
    assert any(".lora_B." in k and v.abs().sum() > 0 for k, v in weights.items() if "layers.1." in k)


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_accumulation_and_clipping_equal_monolithic(checkpoint, tmp_path, family):
    _, folder = checkpoint(family)
    module, weights = split_run(folder, tmp_path, "lora", accumulate=2, clip=0.5)
    assert module.server.steps == STEPS  # the trunk steps on the client's boundaries, not per micro-batch
    losses, mono = monolithic_run(folder, "lora", accumulate=2, clip=0.5)
    assert_same(module._stats["losses"], weights, losses, mono)
    # clipping really bit: without it the weights differ
    _, unclipped = monolithic_run(folder, "lora", accumulate=2)
    assert max((unclipped[k] - mono[k]).abs().max().item() for k in mono) > 1e-3


@pytest.mark.parametrize("transport", ["local", "tcp", pytest.param("tls", marks=needs_openssl)])
def test_pipelined_micro_batches_equal_monolithic(checkpoint, tmp_path, monkeypatch, transport):
    """Each batch as 2 micro-batches in flight at once (the bottom's backward deferred until both gradients are
    back), with accumulation and clipping: the losses and weights of monolithic training of the whole batches."""
    import threading

    from splittrain.transport.tcp import TcpServer, server_tls_context

    _, folder = checkpoint("qwen2")
    options, server, tcp = {"pipeline": 2}, None, None
    if transport in ("tcp", "tls"):
        token = "p" * 32
        monkeypatch.setenv("SPLITTRAIN_TOKEN", token)
        owner = ClientModule(model=str(folder), cuts=CUTS, trunk=TrunkSettings(lora=LORA, optim=OPTIM), seed=3)
        server = owner.build_server(STEPS, tmp_path / "server")
        tls = None
        if transport == "tls":
            cert, key = self_signed(tmp_path, "server")
            tls = server_tls_context(str(cert), str(key))
            options["tls_ca"] = str(cert)
        tcp = TcpServer(server, "127.0.0.1:0", {"client0": token}, tls=tls)
        threading.Thread(target=tcp.serve_forever, daemon=True).start()
        options.update(transport="tcp", address=tcp.address)
    try:
        module, weights = split_run(folder, tmp_path, "lora", accumulate=2, clip=0.5, server=server, **options)
    finally:
        if tcp is not None:
            tcp.stop()
    counters = (server or module.server).counters
    assert counters["forward"] == counters["backward"] == 2 * 2 * STEPS  # 2 micro-batches of each batch
    assert counters["steps_applied"] == STEPS
    losses, mono = monolithic_run(folder, "lora", accumulate=2, clip=0.5)
    assert_same(module._stats["losses"], weights, losses, mono)


def test_pipelined_validation_equals_whole_batches(checkpoint, tmp_path):
    """Validation batches cross as 2 micro-batches in flight at once: the loss and metrics of whole batches."""
    _, folder = checkpoint("qwen2")
    results, forwards = {}, {}
    for pipeline in (1, 2):
        module = ClientModule(model=str(folder), cuts=CUTS, trunk=TrunkSettings(lora=LORA, optim=OPTIM), seed=3,
                              pipeline=pipeline)
        check = L.Trainer(max_steps=STEPS, logger=False, enable_progress_bar=False, enable_model_summary=False,
                          default_root_dir=tmp_path, accelerator="cpu")
        results[pipeline] = check.validate(module, dataloaders=DataLoader(batches(3), batch_size=None), verbose=False)[0]
        forwards[pipeline] = module.server.counters["forward"]
    assert "val_loss" in results[1] and len(results[1]) > 1 and results[2].keys() == results[1].keys()
    for name, value in results[1].items():
        assert results[2][name] == pytest.approx(value, rel=1e-6, abs=1e-6), name
    assert forwards == {1: 3, 2: 6}


def test_pipeline_settings_are_checked():
    with pytest.raises(ValueError, match="number of micro-batches per batch"):
        ClientModule(pipeline=0)


def test_frozen_client_trains_only_the_trunk(checkpoint, tmp_path):
    _, folder = checkpoint("qwen2")
    module, weights = split_run(folder, tmp_path, "frozen")
    assert module.client_adapters() == {}
    assert module.server.steps == STEPS
    trunk_b = [v for k, v in weights.items() if ".lora_B." in k]
    assert trunk_b and all(v.abs().sum() > 0 for v in trunk_b)


def test_mixed_precision_on_the_client(checkpoint, tmp_path):
    """Lightning's precision plugin runs the client under bf16 autocast; the trunk keeps stepping with it."""
    _, folder = checkpoint("qwen2")
    module = ClientModule(model=str(folder), cuts=CUTS, client="lora", client_lora=LORA, optim=OPTIM,
                          trunk=TrunkSettings(lora=LORA, optim=OPTIM))
    trainer = L.Trainer(max_steps=2, precision="bf16-mixed", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp_path, accelerator="cpu")
    trainer.fit(module, train_dataloaders=DataLoader(batches(2), batch_size=None))
    assert module.server.steps == 2 and all(torch.isfinite(torch.tensor(module._stats["losses"])))
