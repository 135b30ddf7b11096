"""What ``model.federated.weighting`` weighs: the trunk's gradient mean under ``trunk_update: sync`` is weighted by
the clients' shard sizes for FedAvg with ``weighting: samples``, and uniform for FedAvg with ``uniform`` and for
FedSGD whatever ``weighting`` says (README's ``weighting`` row, :class:`splittrain.federated.FederatedSettings`)."""

from __future__ import annotations

import pytest
import torch

from splittrain.federated import FederatedSettings
from splittrain.server import TrunkServer
from test_federated import split_run

SAMPLES = [30, 10, 20]  # shard sizes (training examples) of clients 0, 1, 2


@pytest.mark.parametrize("average,weighting,weights", [
    ("weights", "samples", SAMPLES),  # FedAvg, sample-weighted: sum_c n_c g_c / sum_c n_c
    ("weights", "uniform", [1, 1, 1]),
    ("gradients", "samples", [1, 1, 1]),  # FedSGD averages uniformly, as DDP does, whatever weighting says
])
def test_sync_trunk_steps_on_the_weighted_mean_of_the_clients_gradients(checkpoint, tmp_path, monkeypatch, average,
                                                                        weighting, weights):
    _, folder = checkpoint("qwen2")
    arrived: list[dict[int, dict[str, torch.Tensor]]] = [{}]  # per trunk step: client index -> its trunk gradients
    applied: list[dict[str, torch.Tensor]] = []  # per trunk step: the gradients the trunk stepped on
    federated_step, apply = TrunkServer._federated_step, TrunkServer._apply

    def spy_step(self, session, header):
        if header.get("participant", True) and session.grads:
            arrived[-1][session.index] = {k: g.detach().clone() for k, g in session.grads.items()}
        return federated_step(self, session, header)

    def spy_apply(self, *args):  # (adapter,) grads, scale: the gradients the trunk steps on come last but one
        applied.append({k: g.detach().clone() for k, g in args[-2].items()})
        arrived.append({})
        return apply(self, *args)

    monkeypatch.setattr(TrunkServer, "_federated_step", spy_step)
    monkeypatch.setattr(TrunkServer, "_apply", spy_apply)
    settings = FederatedSettings(clients=3, average=average, weighting=weighting, trunk_update="sync",
                                 average_every=2 if average == "weights" else 1)
    module = split_run(folder, tmp_path, settings, steps=2, samples=SAMPLES)
    assert module.server.steps == 2 and len(applied) == 2  # one trunk step per step, on all three clients' gradients
    for grads, used in zip(arrived, applied):
        assert sorted(grads) == [0, 1, 2] and set(used) == set(grads[0])
        for name, got in used.items():
            expected = sum(w * grads[c][name] for c, w in enumerate(weights)) / sum(weights)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
        if weights != [1, 1, 1]:  # the clients' gradients differ enough for the weighting to show
            plain = {name: sum(grads[c][name] for c in range(3)) / 3 for name in used}
            assert max((used[name] - plain[name]).abs().max().item() for name in used) > 1e-4
