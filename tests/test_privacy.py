"""Defenses at the cuts: applied on the client, at the expected scale, reproducible, and a no-op when off."""

from __future__ import annotations

import json

import pytest
import torch

from splittrain.privacy import Defense, PrivacySettings, clip_per_example


def client(folder, **privacy):
    from splittrain.modules import ClientModule

    module = ClientModule(model=str(folder), cuts=(1, 3), client="lora", privacy=PrivacySettings(**privacy))
    module.configure_model()
    return module


def capture(module) -> dict[str, list[torch.Tensor]]:
    """What the in-process trunk server receives, per message kind."""
    frames: dict[str, list[torch.Tensor]] = {"forward": [], "backward": []}
    handle = module.server.handle

    def recording(client_name, kind, header, tensors, *args, **kwargs):
        if kind in frames:
            frames[kind].append(next(iter(tensors.values())).detach().clone())
        return handle(client_name, kind, header, tensors, *args, **kwargs)

    module.server.handle = recording
    return frames


def step(module, ids, mask):
    labels = ids.clone()
    out = module({"input_ids": ids, "attention_mask": mask, "labels": labels}, key=("train", 0, 0))
    out.loss.backward()
    return out.loss.item()


@pytest.fixture
def tiny(checkpoint):
    from conftest import batch

    _, folder = checkpoint("qwen2")
    ids, mask = batch(None, batch_size=4, length=16)
    return folder, ids, mask


def test_the_server_receives_defended_activations_at_the_expected_scale(tiny):
    folder, ids, mask = tiny
    clean = client(folder).bottom(ids, attention_mask=mask).hidden_states.detach()
    big, sigma = 1e6, 1e-5  # a bound no example reaches: the difference is the noise alone, std sigma x C = 10
    module = client(folder, activation_clip=big, activation_noise=sigma, seed=3)
    frames = capture(module)
    step(module, ids, mask)
    diff = frames["forward"][0] - clean
    assert diff.mean().abs() < 0.05 * sigma * big and abs(diff.std().item() / (sigma * big) - 1) < 0.05
    # clipping alone: every example arrives with norm exactly C
    module = client(folder, activation_clip=0.5)
    frames = capture(module)
    step(module, ids, mask)
    norms = torch.linalg.vector_norm(frames["forward"][0].reshape(4, -1), dim=1)
    assert torch.allclose(norms, torch.full((4,), 0.5), rtol=1e-5)


def test_the_gradients_sent_back_are_defended_and_the_noise_never_crosses(tiny):
    folder, ids, mask = tiny
    plain = client(folder)
    frames_plain = capture(plain)
    step(plain, ids, mask)
    big, sigma = 1e6, 1e-7  # std 0.1
    noisy = client(folder, gradient_clip=big, gradient_noise=sigma, seed=5)
    frames_noisy = capture(noisy)
    step(noisy, ids, mask)
    assert torch.equal(frames_noisy["forward"][0], frames_plain["forward"][0])  # cut 1 untouched
    diff = frames_noisy["backward"][0] - frames_plain["backward"][0]
    assert abs(diff.std().item() / (sigma * big) - 1) < 0.05
    # the frames hold only tensors the protocol names: no seed, no noise tensor travels
    assert all(len(f) == 1 for f in frames_noisy.values())
    clipped = client(folder, gradient_clip=1e-4)
    frames = capture(clipped)
    step(clipped, ids, mask)
    norms = torch.linalg.vector_norm(frames["backward"][0].reshape(4, -1), dim=1)
    assert torch.all(norms <= 1e-4 * (1 + 1e-5))


def test_defenses_are_reproducible_with_a_seed_and_off_is_a_no_op(tiny):
    folder, ids, mask = tiny
    runs = {}
    for name, privacy in {"off": {}, "a": dict(activation_clip=20.0, activation_noise=0.1, gradient_clip=0.01,
                                                  gradient_noise=0.5, seed=1),
                          "a again": dict(activation_clip=20.0, activation_noise=0.1, gradient_clip=0.01,
                                          gradient_noise=0.5, seed=1),
                          "b": dict(activation_clip=20.0, activation_noise=0.1, gradient_clip=0.01,
                                    gradient_noise=0.5, seed=2)}.items():
        module = client(folder, **privacy)
        frames = capture(module)
        loss = step(module, ids, mask)
        grads = [p.grad.clone() for p in module.parameters() if p.requires_grad]
        runs[name] = (loss, frames, grads)
    assert runs["a"][0] == runs["a again"][0]
    assert all(torch.equal(x, y) for x, y in zip(runs["a"][2], runs["a again"][2]))
    assert not torch.equal(runs["a"][1]["forward"][0], runs["b"][1]["forward"][0])
    # off: the module holds no defense, and what crosses is the bottom's output as computed without this module
    off = client(folder)
    assert off.defense is None
    assert torch.equal(runs["off"][1]["forward"][0], off.bottom(ids, attention_mask=mask).hidden_states.detach())


def test_settings_are_checked():
    with pytest.raises(ValueError, match="activation_clip must be > 0"):
        PrivacySettings(activation_clip=0)
    with pytest.raises(ValueError, match="gradient_noise is in units of gradient_clip"):
        PrivacySettings(gradient_noise=1.0)
    with pytest.raises(ValueError, match="activation_noise must be >= 0"):
        PrivacySettings(activation_clip=1.0, activation_noise=-1)
    x = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    assert torch.allclose(clip_per_example(x, 1.0), torch.tensor([[0.6, 0.8], [0.3, 0.4]]))
    defense = Defense(PrivacySettings(activation_clip=1.0, activation_noise=1.0, seed=4))
    first = defense.activations(torch.zeros(2, 3, 4))
    state = defense.state_dict()
    second = defense.activations(torch.zeros(2, 3, 4))
    defense.load_state_dict(state)
    assert torch.equal(defense.activations(torch.zeros(2, 3, 4)), second) and not torch.equal(first, second)


def test_a_defended_fit_is_reproducible_and_resumes_exactly(tmp_path):
    from splittrain.cli import main

    def fit(run, *extra):
        main(["fit", "--config", "configs/quickstart.yaml", "--trainer.default_root_dir", str(run),
              "--trainer.max_steps", "6", "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "1",
              "--trainer.enable_progress_bar", "false", "--trainer.callbacks.init_args.every_n_train_steps", "3",
              "--data.limit", "64", "--data.batch_size", "8", "--model.sample_prompt", "null",
              "--model.eval_generate", "false", "--model.privacy.activation_clip", "30",
              "--model.privacy.activation_noise", "0.05", "--model.privacy.gradient_clip", "0.05",
              "--model.privacy.gradient_noise", "0.5", "--model.privacy.seed", "7", *extra])
        return json.loads((run / "summary.json").read_text())["train_losses"]

    first, again = fit(tmp_path / "a"), fit(tmp_path / "b")
    assert first == again
    fit(tmp_path / "c", "--trainer.max_steps", "3")
    resumed = fit(tmp_path / "c", "--ckpt_path", "last")
    assert resumed == first[3:]


@pytest.mark.slow
def test_the_audit_recovers_tokens_without_defenses_and_less_with_them(tmp_path, capsys):
    """A frozen one-layer bottom and no defense: the server recovers the client's tokens and labels; clipping and
    noise cut both and cost validation loss. The server's side sees public rows and frames only."""
    import inspect

    from splittrain.cli import main
    from splittrain.audit import ServerAttacker

    import yaml

    reports = {}
    for name, privacy in {"open": {}, "defended": dict(activation_clip=20, activation_noise=1.0, gradient_clip=0.01,
                                                       gradient_noise=2.0)}.items():
        run = yaml.safe_load(open("configs/quickstart.yaml"))
        run["trainer"].update(default_root_dir=str(tmp_path / name), max_steps=30, val_check_interval=30,
                              limit_val_batches=2, enable_progress_bar=False)
        run["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = 30
        run["model"].update(cuts=[1, 4], client="frozen", privacy=privacy, eval_generate=False, sample_prompt=None)
        config = tmp_path / f"{name}.yaml"
        config.write_text(yaml.safe_dump(run))
        main(["fit", "--config", str(config)])
        reports[name] = main(["audit", "--config", str(config), "--ckpt_path", "last", "--client_rows", "60",
                              "--public_rows", "200"])
        assert json.loads((tmp_path / name / "audit.json").read_text())["token_recovery"] == reports[name]["token_recovery"]
    open_, defended = reports["open"], reports["defended"]
    assert open_["token_recovery"] >= 0.9 and open_["rows_half_recovered_decoder"] >= 0.9
    assert open_["label_inference"] >= 0.5
    assert defended["token_recovery"] < 0.5 * open_["token_recovery"]
    assert defended["label_inference"] < 0.5 * open_["label_inference"]
    assert defended["val_loss"] > open_["val_loss"]
    assert "token_recovery" in capsys.readouterr().out
    # the attacker's interface takes public batches, its own trunk and frames: no client rows
    assert list(inspect.signature(ServerAttacker.invert).parameters) == ["self", "frames"]
    assert list(inspect.signature(ServerAttacker.infer_labels).parameters) == ["self", "grads"]
    assert list(inspect.signature(ServerAttacker.learn).parameters) == ["self", "batches", "trunk"]
