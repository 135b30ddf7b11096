"""Activation checkpointing on either party: the same training (1e-6) in process, over tcp with pipelining, with
federated clients and with the privacy defenses, and far fewer tensors kept for backward."""

from __future__ import annotations

import threading

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from splittrain import split_model
from splittrain.federated import FederatedSettings
from splittrain.lora import LoraSettings, adapter_state_dict, prepare
from splittrain.modules import ClientModule, TrunkSettings
from splittrain.privacy import PrivacySettings
from splittrain.segments import Activations
from conftest import batch
from test_federated import ClientData, split_weights
from test_training import CUTS, OPTIM, STEPS, batches

DROPOUT = LoraSettings(r=4, alpha=8, dropout=0.2)  # the recomputed forward must draw the same dropout masks
NO_DROPOUT = LoraSettings(r=4, alpha=8)
TIGHT = 1e-6


def run(folder, tmp_path, checkpointing: bool, server=None, steps: int = STEPS, data=None, lora=DROPOUT, **options):
    """Split training (LoRA with dropout on both parties) with or without checkpointing on both parties."""
    module = ClientModule(model=str(folder), cuts=CUTS, client="lora", client_lora=lora, optim=OPTIM, seed=3,
                          trunk=TrunkSettings(lora=lora, optim=OPTIM, gradient_checkpointing=checkpointing),
                          gradient_checkpointing=checkpointing, **options)
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                        default_root_dir=tmp_path, accelerator="cpu",
                        gradient_clip_val=None if data is not None else 0.5)  # federated clients clip themselves
    torch.manual_seed(11)  # the same dropout masks in every run
    if data is None:
        trainer.fit(module, train_dataloaders=DataLoader(batches(steps), batch_size=None))
    else:
        trainer.fit(module, datamodule=data)
    return module


def weights_of(module, server=None) -> dict[str, torch.Tensor]:
    return {**module.client_adapters(), **adapter_state_dict((server or module.server).trunk)}


def assert_equal(losses_a, weights_a, losses_b, weights_b, tol: float = TIGHT) -> None:
    assert len(losses_a) == len(losses_b) > 0
    for i, (a, b) in enumerate(zip(losses_a, losses_b)):
        assert abs(a - b) <= tol, f"micro-batch {i}: {a} vs {b}"
    assert set(weights_a) == set(weights_b) and weights_a
    for key in sorted(weights_a):
        diff = (weights_a[key] - weights_b[key]).abs().max().item()
        assert diff <= tol, f"{key}: max abs diff {diff}"


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_checkpointed_training_equals_uncheckpointed(checkpoint, tmp_path, family):
    _, folder = checkpoint(family)
    plain = run(folder, tmp_path / "plain", False)
    checked = run(folder, tmp_path / "checked", True)
    assert checked.bottom.gradient_checkpointing and checked.top.gradient_checkpointing
    assert checked.server.trunk.gradient_checkpointing and not plain.server.trunk.gradient_checkpointing
    assert_equal(checked._stats["losses"], weights_of(checked), plain._stats["losses"], weights_of(plain))
    assert plain._stats["losses"][-1] != plain._stats["losses"][0]


def test_checkpointed_tcp_pipelined_training_equals_uncheckpointed(checkpoint, tmp_path, monkeypatch):
    """Over tcp, 2 micro-batches in flight per batch, the trunk server recomputing each one's layers when its
    gradient arrives (another micro-batch's forward pass ran in between): the in-process uncheckpointed run. No
    dropout here: the server's thread and the client share this process's random generator in a varying order."""
    from splittrain.transport.tcp import TcpServer

    _, folder = checkpoint("qwen2")
    plain = run(folder, tmp_path / "plain", False, pipeline=2, lora=NO_DROPOUT)
    token = "c" * 32
    monkeypatch.setenv("SPLITTRAIN_TOKEN", token)
    owner = ClientModule(model=str(folder), cuts=CUTS, seed=3,
                         trunk=TrunkSettings(lora=NO_DROPOUT, optim=OPTIM, gradient_checkpointing=True))
    server = owner.build_server(STEPS, tmp_path / "server")
    tcp = TcpServer(server, "127.0.0.1:0", {"client0": token})
    threading.Thread(target=tcp.serve_forever, daemon=True).start()
    try:
        checked = run(folder, tmp_path / "checked", True, server=server, pipeline=2, transport="tcp",
                      address=tcp.address, lora=NO_DROPOUT)
    finally:
        tcp.stop()
    assert server.trunk.gradient_checkpointing and server.counters["forward"] == 2 * STEPS
    assert_equal(checked._stats["losses"], weights_of(checked, server), plain._stats["losses"], weights_of(plain))


def test_checkpointed_federated_clients_with_defenses_equal_uncheckpointed(checkpoint, tmp_path):
    """Three simulated clients (FedSGD, pipelined) with clipped and noised activations and gradients."""
    _, folder = checkpoint("qwen2")
    settings = FederatedSettings(clients=3, average="gradients", trunk_update="sync")
    privacy = PrivacySettings(activation_clip=5.0, activation_noise=0.05, gradient_clip=1.0, gradient_noise=0.01,
                              seed=7)
    runs = [run(folder, tmp_path / str(flag), flag, steps=3, data=ClientData(3, 3, [10] * 3), federated=settings,
                privacy=privacy, pipeline=2) for flag in (False, True)]
    plain, checked = runs
    assert checked.bottom.gradient_checkpointing
    for c in range(3):
        assert_equal(checked.clients[c].losses, split_weights(checked, c), plain.clients[c].losses,
                     split_weights(plain, c))


def test_checkpointing_keeps_only_each_layers_input(checkpoint):
    """A trunk's forward pass keeps for backward only its layers' inputs (and LoRA's): far fewer bytes."""
    _, folder = checkpoint("qwen2", num_hidden_layers=6)
    trunk = prepare(split_model(folder, cuts=(1, 5), parts=("trunk",))["trunk"], "lora", DROPOUT)
    trunk.train()
    ids, mask = batch(None, batch_size=2, length=16)
    hidden = torch.randn(2, 16, trunk.config.hidden_size, requires_grad=True)
    positions = torch.arange(16).expand(2, 16)

    def saved_bytes() -> int:
        sizes: list[int] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            sizes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = trunk(Activations(hidden, mask, positions)).hidden_states
        out.sum().backward()
        return sum(sizes)

    plain = saved_bytes()
    trunk.set_gradient_checkpointing(True)
    checked = saved_bytes()
    assert checked < plain / 4, (checked, plain)
    trunk.set_gradient_checkpointing(False)
    assert not trunk.gradient_checkpointing and saved_bytes() == plain
