"""Several clients, one trunk: the federated modes equal reference loops over the unsplit transformers model."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from splittrain.federated import FederatedSettings
from splittrain.lora import adapter_state_dict
from splittrain.modules import ClientModule, TrunkSettings
from splittrain.optim import OptimSettings, build_optimizer
from conftest import VOCAB
from test_training import CUTS, LORA, layer_of, peft_model

OPTIM = OptimSettings(lr=2e-2, weight_decay=0.01, schedule="linear", warmup_steps=2)


def client_batches(client: int, steps: int) -> list[dict[str, torch.Tensor]]:
    """Client ``client``'s batches: each client has its own batch shape and padding, so token counts differ."""
    g = torch.Generator().manual_seed(100 + client)
    rows, length = 2 + client % 2, 7 + 2 * client
    out = []
    for _ in range(steps):
        ids = torch.randint(0, VOCAB, (rows, length), generator=g)
        mask = torch.ones(rows, length, dtype=torch.long)
        mask[1, length - 2 - client:] = 0  # right padding of a different length per client
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return out


class ClientData(L.LightningDataModule):
    """Fixed batches per client; ``samples`` are the shard sizes that sample-weighted averages use."""

    def __init__(self, clients: int, steps: int, samples: list[int]) -> None:
        super().__init__()
        self.batches = {c: client_batches(c, steps) for c in range(clients)}
        self.samples = samples
        self.held: list[int] = []

    def shard(self, clients: int, held: list[int]) -> None:
        assert clients == len(self.batches)
        self.held = list(held)

    def client_dataset(self, client: int, split: str) -> list[int]:
        return list(range(self.samples[client]))

    def train_dataloader(self):
        return {c: DataLoader(self.batches[c], batch_size=None) for c in self.held}


def split_run(folder, tmp_path, federated: FederatedSettings, steps: int, samples: list[int], client: str = "lora",
              pipeline: int = 1):
    module = ClientModule(model=str(folder), cuts=CUTS, client=client, client_lora=LORA, optim=OPTIM,
                          trunk=TrunkSettings(lora=LORA, optim=OPTIM), seed=3, federated=federated, pipeline=pipeline)
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                        default_root_dir=tmp_path, accelerator="cpu")
    trainer.fit(module, datamodule=ClientData(federated.clients, steps, samples))
    return module


def split_weights(module: ClientModule, client: int) -> dict[str, torch.Tensor]:
    module.use(module.clients[client])
    weights = {**adapter_state_dict(module.bottom), **adapter_state_dict(module.top),
               **adapter_state_dict(module.server.trunk)}
    if module.client_mode == "full":
        weights.update({k: v.clone() for s in (module.bottom, module.top) for k, v in s.state_dict().items()})
    return {k: v.detach().clone() for k, v in weights.items()}


def reference_model(folder, client: str):
    model, family = peft_model(folder, client)
    trunk = {n: p for n, p in model.named_parameters() if p.requires_grad and layer_of(n, family.layer_path) in range(*CUTS)}
    own = {n: p for n, p in model.named_parameters() if p.requires_grad and n not in trunk}
    return model, family, own, trunk


def reference_weights(model, family, client: str) -> dict[str, torch.Tensor]:
    weights = adapter_state_dict(model)
    if client == "full":
        state = model.state_dict()
        weights.update({k: state[k] for k in state if ".lora_" not in k
                        and layer_of(k, family.layer_path) not in range(*CUTS)})
    return {k: v.detach().clone() for k, v in weights.items()}


def ddp_reference(folder, clients: int, steps: int, client: str = "lora"):
    """FedSGD as DDP: each client's mean loss on its batch, gradients averaged over clients, one AdamW."""
    model, family, own, trunk = reference_model(folder, client)
    params = list(own.values()) + list(trunk.values())
    optimizer, scheduler = build_optimizer(params, OPTIM, steps)
    data = {c: client_batches(c, steps) for c in range(clients)}
    losses = {c: [] for c in range(clients)}
    model.train()
    for step in range(steps):
        grads = []
        for c in range(clients):
            loss = model(**data[c][step]).loss
            losses[c].append(loss.item())
            grads.append(torch.autograd.grad(loss, params))
        for p, *per_client in zip(params, *grads):
            p.grad = torch.stack(per_client).mean(0)  # what DDP's all-reduce leaves in every replica
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return losses, reference_weights(model, family, client)


def fedavg_reference(folder, settings: FederatedSettings, steps: int, samples: list[int], client: str = "lora"):
    """FedAvg with split trunk: own AdamW per client, K local steps, sample-weighted weight averages over each
    round's drawn clients; the trunk steps per client step (sequential) or on the weighted mean (sync)."""
    model, family, own, trunk = reference_model(folder, client)
    n = settings.clients
    local = {c: {k: torch.nn.Parameter(p.detach().clone()) for k, p in own.items()} for c in range(n)}
    optimizers = {c: build_optimizer(list(local[c].values()), OPTIM, steps) for c in range(n)}
    per_round = max(1, int(settings.client_fraction * n + 0.5))
    trunk_total = steps * per_round if settings.trunk_update == "sequential" else steps
    trunk_opt, trunk_sched = build_optimizer(list(trunk.values()), OPTIM, trunk_total)
    data = {c: client_batches(c, steps) for c in range(n)}
    losses = {c: [] for c in range(n)}
    model.train()
    drawn = []
    for step in range(steps):
        rnd = step // settings.average_every
        order = torch.randperm(n, generator=torch.Generator().manual_seed(settings.seed * 1_000_003 + rnd))
        chosen = sorted(order[:per_round].tolist())
        drawn.append(chosen)
        trunk_grads = []
        for c in range(n):
            optimizer, scheduler = optimizers[c]
            if c in chosen:
                with torch.no_grad():
                    for k, p in own.items():
                        p.copy_(local[c][k])
                loss = model(**data[c][step]).loss
                losses[c].append(loss.item())
                loss.backward()
                for k, p in own.items():
                    local[c][k].grad, p.grad = p.grad, None
                optimizer.step()
                optimizer.zero_grad()
                if settings.trunk_update == "sequential":
                    trunk_opt.step()
                    trunk_sched.step()
                    trunk_opt.zero_grad()
                else:
                    trunk_grads.append(({k: p.grad for k, p in trunk.items()}, samples[c]))
                    for p in trunk.values():
                        p.grad = None
            scheduler.step()
        if settings.trunk_update == "sync":
            total = sum(w for _, w in trunk_grads)
            for k, p in trunk.items():
                p.grad = sum(g[k] * w for g, w in trunk_grads) / total
            trunk_opt.step()
            trunk_sched.step()
            trunk_opt.zero_grad()
        if (step + 1) % settings.average_every == 0:
            total = sum(samples[c] for c in chosen)
            with torch.no_grad():
                for k in own:
                    mean = sum(local[c][k].double() * samples[c] for c in chosen) / total
                    for c in range(n):
                        local[c][k].copy_(mean)
    with torch.no_grad():
        for k, p in own.items():
            p.copy_(local[0][k])
    return losses, reference_weights(model, family, client), drawn


def assert_close(split: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], tol: float) -> None:
    assert set(split) <= set(reference) and set(reference) - set(split) <= {"lm_head.weight"}
    for key in sorted(split):
        diff = (split[key] - reference[key]).abs().max().item()
        assert diff <= tol, f"{key}: max abs diff {diff}"


@pytest.mark.parametrize("clients,client,pipeline", [(2, "lora", 1), (3, "lora", 1), (3, "full", 1), (3, "lora", 2)])
def test_gradient_averaging_equals_ddp(checkpoint, tmp_path, clients, client, pipeline):
    """FedSGD equals DDP; with ``pipeline`` 2 each client's batch crosses as 2 micro-batches (of 1 and 1 or 2 and
    1 rows) and still gives its whole batch's loss and gradients."""
    _, folder = checkpoint("qwen2")
    steps = 4
    settings = FederatedSettings(clients=clients, average="gradients", trunk_update="sync")
    module = split_run(folder, tmp_path, settings, steps, [10] * clients, client, pipeline)
    losses, reference = ddp_reference(folder, clients, steps, client)
    assert module.server.steps == steps and module.global_step == steps
    assert module.server.counters["forward"] == pipeline * clients * steps
    for c in range(clients):
        split_losses = module.clients[c].losses
        assert len(split_losses) == steps
        assert max(abs(a - b) for a, b in zip(split_losses, losses[c])) <= 1e-5
    assert losses[0][-1] < losses[0][0] - 0.05  # it trains
    weights = [split_weights(module, c) for c in range(clients)]
    for c in range(clients):
        assert_close(weights[c], reference, 1e-5)  # every client holds the same client-side weights


@pytest.mark.parametrize("trunk_update,pipeline", [("sequential", 1), ("sync", 1), ("sequential", 2)])
def test_weight_averaging_equals_fedavg(checkpoint, tmp_path, trunk_update, pipeline):
    _, folder = checkpoint("gemma3")
    steps, samples = 9, [30, 10, 20, 40]
    settings = FederatedSettings(clients=4, average="weights", average_every=3, weighting="samples",
                                 client_fraction=0.5, seed=7, trunk_update=trunk_update)
    module = split_run(folder, tmp_path, settings, steps, samples, pipeline=pipeline)
    losses, reference, drawn = fedavg_reference(folder, settings, steps, samples)
    assert [settings.participants(settings.round_of(s)) for s in range(steps)] == drawn
    assert len({tuple(d) for d in drawn}) > 1  # the draw changes between rounds
    for c in range(4):
        assert module.clients[c].losses == pytest.approx(losses[c], abs=1e-5)
    assert module.server.steps == (steps * 2 if trunk_update == "sequential" else steps)
    # Micro-batches sum each gradient in another order; after 9 AdamW steps at lr 2e-2 that moved one weight by
    # 1.3e-5 on one machine and 2.08e-5 on another (without the micro-batches' loss weighting the losses are twice
    # the reference's).
    for c in range(4):
        assert_close(split_weights(module, c), reference, 1e-5 if pipeline == 1 else 4e-5)


def federated_server(folder, tmp_path, clients: int, round_timeout: float = 60.0):
    from splittrain.server import TrunkServer, load_trunk

    trunk = load_trunk(str(folder), CUTS, LORA, seed=1)
    settings = FederatedSettings(clients=clients, round_timeout=round_timeout)
    return TrunkServer(trunk, OPTIM, total_steps=10, run_dir=tmp_path / "run", federation=settings), settings


def run_clients(tcp, server, clients: dict[str, int], work) -> dict[str, object]:
    """One thread per client: a TcpTransport link that joins as its index, then ``work(index, link)``."""
    import threading

    from splittrain.cut import TrunkLink
    from splittrain.transport.tcp import TcpTransport

    results: dict[str, object] = {}

    def client(name: str, index: int) -> None:
        try:
            link = TrunkLink(TcpTransport(tcp.address, name, "t" * 32, server.fingerprint, timeout=60))
            link.join(index, 10 * (index + 1))
            results[name] = work(index, link)
            link.close()
        except Exception as exc:  # reported by the test
            results[name] = exc

    threads = [threading.Thread(target=client, args=item, daemon=True) for item in clients.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    return results


@pytest.fixture
def tcp_federation(checkpoint, tmp_path):
    """``make(clients, round_timeout) -> (TcpServer, TrunkServer, settings)`` serving in a thread; stopped at the end."""
    import threading

    from splittrain.transport.tcp import TcpServer

    _, folder = checkpoint("qwen2")
    started = []

    def make(clients: int, round_timeout: float = 60.0):
        server, settings = federated_server(folder, tmp_path, clients, round_timeout)
        tcp = TcpServer(server, "127.0.0.1:0", {f"c{i}": "t" * 32 for i in range(clients)})
        thread = threading.Thread(target=tcp.serve_forever, daemon=True)
        thread.start()
        started.append((tcp, thread))
        return tcp, server, settings

    yield make
    for tcp, thread in started:
        tcp.stop()
        thread.join(timeout=10)


def test_secure_aggregation_hides_each_update(tcp_federation):
    """What the server receives differs from every client's update; the average it helps compute is exact."""
    from splittrain.federated import SecureAverager

    tcp, server, settings = tcp_federation(3)
    received = []
    aggregate = server._handlers["aggregate"]
    server._handlers["aggregate"] = lambda s, h, t: (received.append(t["masked"].clone()), aggregate(s, h, t))[1]
    updates = {i: torch.randn(5000, dtype=torch.float64) * (i + 1) for i in range(3)}
    weights = {0: 10.0, 1: 30.0, 2: 5.0}

    def work(index: int, link):
        averager = SecureAverager(link, index, FederatedSettings(clients=3, average="weights"), int(weights[index]))
        return averager.average({index: updates[index]}, {index: weights[index]}, "test", 0)

    results = run_clients(tcp, server, {"c0": 0, "c1": 1, "c2": 2}, work)
    expected = sum(updates[i] * weights[i] for i in range(3)) / sum(weights.values())
    for name, got in results.items():
        assert isinstance(got, torch.Tensor), got
        assert (got - expected).abs().max().item() <= 1e-6
    assert len(received) == 3
    for masked in received:
        for i, update in updates.items():
            plain = torch.round(update * weights[i] / 45.0 * 2.0 ** SecureAverager.SCALE_BITS).to(torch.int64)
            assert (masked != plain).float().mean() > 0.99  # not the update, nor any client's
            as_float = masked.double() / 2.0 ** SecureAverager.SCALE_BITS / (weights[i] / 45.0)
            assert (as_float - update).abs().median() > 1e3  # decoding it alone gives noise
    assert server.counters["aggregations"] == 3


def test_secure_aggregation_goes_on_without_a_dropped_client(tcp_federation, caplog):
    """A client that agreed keys but never sends its update is dropped after round_timeout, named in the log; the
    others redo the round among themselves and get their own average."""
    import logging

    from splittrain.federated import SecureAverager

    import threading

    tcp, server, _ = tcp_federation(3, round_timeout=2.0)
    updates = {i: torch.full((100,), float(i + 1), dtype=torch.float64) for i in range(3)}
    finished = threading.Event()

    def work(index: int, link):
        averager = SecureAverager(link, index, FederatedSettings(clients=3, round_timeout=2.0), 10)
        if index == 2:
            finished.wait(60)  # stops answering after the key exchange, until the others are done
            return "silent"
        average = averager.average({index: updates[index]}, {index: 1.0}, "test", 0)
        finished.set()
        return average

    with caplog.at_level(logging.WARNING, logger="splittrain.server"):
        results = run_clients(tcp, server, {"c0": 0, "c1": 1, "c2": 2}, work)
    for name in ("c0", "c1"):
        assert torch.allclose(results[name], torch.full((100,), 1.5, dtype=torch.float64), atol=1e-9), results[name]
    assert server.dropped == {2}
    assert any("'c2'" in r.getMessage() and "round_timeout" in r.getMessage() for r in caplog.records)


def test_a_client_left_alone_still_averages_through_the_server(tcp_federation):
    """Once the other client is dropped, the lone client's round still goes to the server (a client rejoining at
    that step waits there for the federation's state): its update is the round's sum, sent in fixed point, and the
    average it gets back is its own update."""
    import threading

    from splittrain.federated import SecureAverager

    tcp, server, _ = tcp_federation(2, round_timeout=2.0)
    received = []
    aggregate = server._handlers["aggregate"]
    server._handlers["aggregate"] = lambda s, h, t: (received.append((h["participants"], t["masked"].clone())),
                                                     aggregate(s, h, t))[1]
    update = torch.randn(100, dtype=torch.float64)
    finished = threading.Event()

    def work(index: int, link):
        averager = SecureAverager(link, index, FederatedSettings(clients=2, round_timeout=2.0), 10)
        if index == 1:
            finished.wait(60)  # silent after the key exchange: dropped after round_timeout
            return "silent"
        average = averager.average({0: update}, {0: 1.0}, "test", 0)
        finished.set()
        return average

    results = run_clients(tcp, server, {"c0": 0, "c1": 1}, work)
    assert (results["c0"] - update).abs().max().item() <= 2.0 ** -SecureAverager.SCALE_BITS
    assert [p for p, _ in received] == [[0, 1], [0]]  # masked for both, then alone
    lone = received[1][1]
    # weight 1 of the two clients' agreed total 2: the update's half, in fixed point, as the round's sum
    assert torch.equal(lone, torch.round(update / 2 * 2.0 ** SecureAverager.SCALE_BITS).to(torch.int64))
    assert server.dropped == {1}


def quickstart_fit(run, *extra: str, steps: int = 6):
    from pathlib import Path

    from splittrain.cli import main

    config = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
    return main(["fit", "--config", str(config), "--trainer.default_root_dir", str(run),
                 "--trainer.max_steps", str(steps), "--trainer.val_check_interval", "3",
                 "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar", "false",
                 "--trainer.enable_model_summary", "false", "--trainer.callbacks.init_args.every_n_train_steps", "3",
                 "--data.limit", "96", "--data.batch_size", "4", "--model.sample_prompt", "null",
                 "--model.eval_generate", "false", "--model.client", "lora", "--model.federated.clients", "3", "--model.federated.average", "weights",
                 "--model.federated.average_every", "2", "--model.federated.client_fraction", "0.67",
                 "--data.partition", "column", "--data.partition_column", "task", *extra])


def test_quickstart_federated_summary_and_resume(tmp_path):
    """`fit --model.federated.clients 3` on task-partitioned data: per-client figures in summary.json, and a run
    stopped after step 3 and resumed from its checkpoint (every client's weights, optimizer and schedule) equals
    the uninterrupted one."""
    import json

    whole = quickstart_fit(tmp_path / "whole").model
    summary = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert set(summary["clients"]) == {"client0", "client1", "client2"}
    for figures in summary["clients"].values():
        assert figures["tokens"] > 0 and 0 < figures["val_loss_own_shard"] < 10
        assert len(figures["train_losses"]) == figures["steps_taken"] <= 6
    taken = [f["steps_taken"] for f in summary["clients"].values()]
    assert sum(taken) == 6 * 2 and min(taken) < 6  # 2 of 3 clients drawn per round
    assert summary["val_loss"] > 0 and summary["steps"] == 6

    quickstart_fit(tmp_path / "parts", steps=3)
    resumed = quickstart_fit(tmp_path / "parts", "--ckpt_path", "last").model
    for index in range(3):
        a, b = resumed.clients[index].losses, whole.clients[index].losses
        assert len(a) == len(b) and max((abs(x - y) for x, y in zip(a, b)), default=0) <= 1e-6, (a, b)
        for p, q in zip(resumed.clients[index].params, whole.clients[index].params):
            assert (p - q).abs().max() <= 1e-6
    trunk = dict(resumed.server.trainable)
    assert all((trunk[n] - p).abs().max() <= 1e-6 for n, p in whole.server.trainable)
