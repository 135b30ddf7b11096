"""LightningModules for the client's side of the cut.

``ClientModule`` holds the bottom and top segments, the data-facing loss and metrics and the client
optimizer; Lightning's automatic optimization, gradient accumulation, precision and checkpointing work as
usual. Its passes go through one :class:`~splittrain.crossing.Crossing` (bottom -> defenses -> cut -> top). The trunk
lives in a :class:`~splittrain.server.TrunkServer` behind a transport (in this process for ``transport="local"``,
another process or machine for ``tcp`` and ``dist``): it steps whenever the client's optimizer steps, and global-norm
clipping spans both sides by exchanging squared gradient norms, so split training gives the numbers monolithic
training gives. A federation's clients are :class:`~splittrain.federated.client.FederatedClients`.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.fabric.plugins import CheckpointIO

from recipes import Recipe, RecipeName

from .crossing import Crossing
from .cut import Pipeline, TrunkLink, make_link
from .errors import UserError
from .federated import FederatedSettings
from .federated.client import FederatedClient, FederatedClients
from .generate import GenerationOptions
from .lora import LoraSettings, TrainMode, adapter_state_dict, prepare
from .metrics import TokenMetrics
from .optim import OptimSettings, build_optimizer
from .privacy import Defense, PrivacySettings
from .quickstart import resolve_model
from .segments import Segment
from .server import TrunkSettings
from .state import load_state, save_state
from .transport import TRANSPORTS, TransportName
from .transport.codec import check_wire_dtype

RUN_FILE = "run.json"
TOKEN_ENV = "SPLITTRAIN_TOKEN"

__all__ = ["ClientModule", "SafetensorsCheckpointIO"]


class ClientModule(L.LightningModule):
    """The client's side: bottom + top segments, loss on its own labels, metrics and the client optimizer.

    Args:
        model: hub id or local folder of the base checkpoint, ``"quickstart"`` for the embedded tiny model, or
            ``"tiny-<recipe>"`` for a tiny random model of a recipe family (``tiny-gemma3``).
        cuts: the two cut layers (bottom = layers before the first, top = layers from the second).
        client: how the client's segments train: ``frozen``, ``lora`` or ``full``.
        client_lora: LoRA settings for the client's layers when ``client="lora"``.
        optim: the client's AdamW and schedule.
        trunk: the trunk's LoRA and optimizer (used by the in-process server and by ``serve``/rank 0 reading
            the same config; a remote server trains with the settings it was started with).
        transport: where the trunk runs: ``local`` (this process), ``tcp`` (a ``python -m splittrain serve``
            at ``address``) or ``dist`` (rank 0 of a ``torchrun`` job).
        address: ``HOST:PORT`` of the trunk server (``tcp``).
        client_name: this client's name in the server's tokens file (``tcp``).
        token_file: file holding this client's token (``tcp``); default: the ``SPLITTRAIN_TOKEN`` environment
            variable. The token is never sent, printed or logged.
        tls_ca: CA certificate file to verify the server's TLS certificate with (``tcp``); required off a
            private network.
        wire_dtype: dtype of hidden states and their gradients on the wire: ``float32`` (exact), ``bfloat16``
            or ``float16`` (half the bytes), ``int8`` (a scale per token, error feedback on gradients: ~0.26x
            float32's bytes); each side computes in its own dtype.
        timeout: seconds to wait for a connection or a reply before treating the server as gone.
        reconnect_timeout: seconds a ``tcp`` client keeps reconnecting (with backoff) to a server that went
            away before it gives up; its session resumes where it stopped.
        seed: seeds the LoRA initialisation (the same seed gives the same adapters however the model is cut).
        dtype: weight dtype (default: the checkpoint's).
        sample_prompt: a user message answered greedily after fitting, to show what the model learnt.
        device_map: device per part (``bottom``, ``trunk``, ``top``) or ``"auto"``, as for ``split_model``;
            in one process this places the trunk (Lightning places the client's parts on its accelerator).
        federated: several clients training one trunk together (see :mod:`splittrain.federated`): in one process
            they are simulated (they share the frozen weights; each has its own trainable tensors, optimizer and
            shard), under torchrun each client rank is one, over tcp each ``fit`` process is one.
        generation: decoding options of :meth:`generate` and of the evaluation by generated answers.
        eval_generate: after ``fit``, run the ``test`` evaluation (perplexity, token accuracy, and exact match,
            ROUGE-L and BLEU of answers generated for the test rows; ``eval.json``/``eval.md`` in the run folder).
        eval_max_rows: rows answered by that evaluation (null: every test row).
        recipe: the model's family recipe (:mod:`recipes`): its LoRA targets become both parties' defaults, and
            the model must be of that family (checked once it is loaded). Its chat template is the data's
            ``chat_template`` fallback, named there.
        privacy: defenses applied on the client before anything crosses (see :mod:`splittrain.privacy`): the
            hidden states at cut 1 (training, validation and generation alike) and the gradients sent back at
            cut 2 are clipped per example and noised; off by default.
        pipeline: micro-batches each training and validation batch is split into (by rows), all in flight
            across the cut at once, so that over ``tcp`` the transfer of one overlaps the compute of another on
            either side (1: no pipelining). The trunk accumulates them into one step and each micro-batch's loss
            counts as its share of the batch's, so the numbers are the whole batch's (to float rounding).
            ``local`` (and ``dist`` under nccl) answers each micro-batch before the next leaves, so gains nothing.
        loss_chunk: trained positions per chunk of the top's LM head + cross-entropy in training, validation and
            test (see :mod:`splittrain.loss`): no float32 batch x tokens x vocab tensor (logits, log-softmax or
            their gradient) is ever whole, only ``loss_chunk x vocab`` ones; the metrics come from the chunks.
            A batch of at most ``loss_chunk`` positions, and 0, compute whole logits and transformers' loss. The
            same numbers either way (to float rounding).
        quantization: the client's frozen base weights (bottom and top decoder layers' projections) in ``int8``,
            ``nf4`` or ``fp4`` (bitsandbytes; see :mod:`splittrain.quantize`), quantized tensor by tensor as they
            load; the embedding, norms and head keep ``dtype``. Not with ``client: full`` (it trains those
            weights). ``trunk.quantization`` is the server's.
        gradient_checkpointing: the client's decoder layers recompute their activations in the backward pass
            instead of keeping them (the same gradients; ``trunk.gradient_checkpointing`` is the server's).
        embedding_quantization: ``int8``: the client's token embedding and an untied LM head stored as int8 rows
            with a float32 scale each (bitsandbytes' ``Embedding8bit``; see :mod:`splittrain.quantize`), the head
            dequantized a block of rows at a time in the loss. At a large vocabulary these are most of the client's
            weights. Not with ``client: full``.
    """

    def __init__(self, model: str = "quickstart", cuts: list[int] | tuple[int, int] = (2, 4),
                 client: TrainMode = "lora", client_lora: LoraSettings = LoraSettings(),
                 optim: OptimSettings = OptimSettings(), trunk: TrunkSettings = TrunkSettings(),
                 transport: TransportName = "local", address: str | None = None,
                 client_name: str = "client0", token_file: str | None = None, tls_ca: str | None = None,
                 wire_dtype: Literal["float32", "bfloat16", "float16", "int8"] = "float32", timeout: float = 600.0,
                 reconnect_timeout: float = 300.0, seed: int = 0, dtype: str | None = None,
                 sample_prompt: str | None = None, device_map: dict[str, str] | str | None = None,
                 federated: FederatedSettings = FederatedSettings(), generation: GenerationOptions = GenerationOptions(),
                 eval_generate: bool = False, eval_max_rows: int | None = 200,
                 recipe: RecipeName | None = None,
                 privacy: PrivacySettings = PrivacySettings(), pipeline: int = 1, loss_chunk: int = 512,
                 quantization: Literal["int8", "nf4", "fp4"] | None = None, gradient_checkpointing: bool = False,
                 embedding_quantization: Literal["int8"] | None = None,
                 ) -> None:
        super().__init__()
        from .quantize import check_embedding_name, check_name

        self.quantization = check_name(quantization)
        self.embedding_quantization = check_embedding_name(embedding_quantization)
        check_name(trunk.quantization)
        _check_arguments(self.quantization, self.embedding_quantization, client, cuts, transport, address,
                         wire_dtype, pipeline, loss_chunk, eval_max_rows, federated)
        self.recipe, client_lora, trunk = _recipe_defaults(recipe, client_lora, trunk)
        self.model_name, self.cuts, self.client_mode = model, tuple(cuts), client
        self.client_lora, self.optim, self.trunk_settings = client_lora, optim, trunk
        self.transport, self.address, self.client_name = transport, address, client_name
        self.token_file, self.tls_ca, self.wire_dtype = token_file, tls_ca, wire_dtype
        self.timeout, self.reconnect_timeout = timeout, reconnect_timeout
        self.seed, self.dtype_name = seed, dtype
        self.sample_prompt, self.device_map = sample_prompt, device_map
        self.gradient_checkpointing, self.loss_chunk, self.pipeline = gradient_checkpointing, loss_chunk, pipeline
        self.generation, self.eval_generate, self.eval_max_rows = generation, eval_generate, eval_max_rows
        self.privacy, self.defense = privacy, Defense(privacy) if privacy.enabled else None
        self.federated, self.federation = federated, FederatedClients(federated, transport)
        self.clients = self.federation.clients
        """The federation's clients this process holds, by index (empty until fit builds them)."""
        self.automatic_optimization = not federated.enabled  # federated clients step their own optimizers
        self.strict_loading = False  # checkpoints hold only the trainable tensors
        self.bottom: Segment | None = None
        self.top: Segment | None = None
        self.crossing: Crossing | None = None
        """bottom -> defenses -> link to the trunk -> top, once :meth:`configure_model` has built them."""
        self.server = None
        self._pipeline: Pipeline | None = None
        """The pipelined batch whose backward pass is under way (see :meth:`backward`)."""
        self._trunk_scale: float | None = None
        self._trunk_lr: float | None = None
        """The trunk's learning rate after the last step, as the server's step reply gives it."""
        self._stats = {"tokens": 0, "losses": [], "began": None}
        self._window: tuple[int, float, int, int] | None = None
        """Optimizer steps done, clock, tokens and wire bytes when the step under way began (see :meth:`_log_step`)."""
        self._suffix = ""
        """Added to the names of validation metrics (``/client1``: a federated client's own shard)."""
        self.history: dict[str, dict[int, float]] = {}
        """Figures of this module's fits by name and optimizer steps done (train and validation losses, per client
        in a federation, and both sides' learning rates): what ``curves.png`` draws, whatever the loggers."""
        self.tokenizer: Any = None
        """The tokenizer :meth:`generate` uses: the datamodule's once attached to a trainer, or set it."""
        self.chat_template: str | None = None
        self.last_eval: dict[str, Any] | None = None
        """Metrics and answers of the last evaluation by generated answers (``test``)."""

    def configure_model(self) -> None:
        if self.bottom is not None:
            return
        from .loading import split_model

        path = resolve_model(self.model_name)
        bottom, top = split_model(path, cuts=self.cuts, parts=("bottom", "top"), dtype=self.dtype_name,
                                  device_map=self.device_map, quantization=self.quantization,
                                  embedding_quantization=self.embedding_quantization)
        if self.recipe is not None and top.family.name != self.recipe.name:
            raise ValueError(f"model.recipe is {self.recipe.name!r} but {self.model_name} is a {top.family.name!r} "
                             f"model: name its own family's recipe, or none")
        self.bottom, self.top = (prepare(part, self.client_mode, self.client_lora, self.seed) for part in (bottom, top))
        for part in (self.bottom, self.top):
            part.set_gradient_checkpointing(self.gradient_checkpointing)
            # Parts load in eval mode, as from_pretrained's models do, and Lightning keeps the modes it finds: the
            # parts follow this module's (train in fit), so their dropout is the unsplit model's.
            part.train(self.training)
        self.top.loss_chunk = self.loss_chunk
        sync = self.transport != "dist"  # rank 0 (the trunk server) takes no part in the client's metrics
        self.train_metrics, self.val_metrics, self.test_metrics = (
            TokenMetrics(self.top.config.vocab_size, sync) for _ in range(3))
        self.crossing = Crossing(self.bottom, self.top, self._connect(self.client_name), self.defense)

    def trunk_schedule(self) -> dict[str, Any] | None:
        """The trunk's AdamW and schedule this client trains with (its steps resolved from the trainer's max_steps):
        the server makes this client's trunk adapter with them, or refuses a federation's that differ. None unless
        this run trains (``fit``): evaluation and generation send no schedule and take the trunk's."""
        from lightning.pytorch.trainer.states import TrainerFn

        training = self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING
        return self.trunk_settings.optim.resolved(self._total_steps()) if training else None

    def _total_steps(self) -> int | None:
        return self.trainer.max_steps if self._trainer is not None and self.trainer.max_steps > 0 else None

    def _connect(self, client: str) -> TrunkLink:
        """A link to the trunk over ``model.transport``, as ``client`` (``local``: to the server built here; ``tcp``
        and ``dist``: after agreeing on model, cuts, hidden size and compute dtype with the server)."""
        from .transport import fingerprint

        if self.transport == "local":
            if self.server is None:
                run_dir = self.run_dir if self._trainer is not None else None
                self.server = self.build_server(self._total_steps(), run_dir)
            return make_link("local", wire_dtype=self.wire_dtype, server=self.server, client=client)
        return make_link(self.transport, wire_dtype=self.wire_dtype, client=client, address=self.address,
                         token=_read_token(self.token_file) if self.transport == "tcp" else None, tls_ca=self.tls_ca,
                         fingerprint=fingerprint(self.top.config, self.top.family.name, self.cuts, self.bottom.dtype),
                         timeout=self.timeout, reconnect_timeout=self.reconnect_timeout, schedule=self.trunk_schedule())

    def build_server(self, total_steps: int | None, run_dir: str | Path | None, limits: Any = None,
                     save_every: int = 0):
        """The :class:`~splittrain.server.TrunkServer` these settings describe (model, cuts, trunk LoRA, optimizer);
        ``serve`` and rank 0 under torchrun build theirs from the same config with this."""
        from .server import TrunkServer, load_trunk

        settings = self.trunk_settings
        trunk = load_trunk(resolve_model(self.model_name), self.cuts, settings.lora, self.seed, self.dtype_name,
                           self.device_map, settings.quantization, settings.gradient_checkpointing)
        return TrunkServer(trunk, settings.optim, total_steps, run_dir=run_dir, limits=limits,
                           save_every=save_every, federation=self.federated)

    def close(self) -> None:
        """End this client's session(s) on the trunk server (it frees the client's graphs)."""
        for link in self.federation.links(self.crossing):
            link.close()

    def setup(self, stage: str) -> None:
        """A federated client takes its shard(s) of the data before the loaders are built. A fit of fewer than ten
        times ``log_every_n_steps`` steps logs more often, so that its curves have ten points or more (every step
        when it has fewer than 20) rather than a few or none."""
        trainer = self._trainer
        if stage == "fit" and trainer is not None and trainer.max_steps > 0 and trainer.log_every_n_steps > 0:
            trainer.log_every_n_steps = min(trainer.log_every_n_steps, max(1, trainer.max_steps // 10))
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if self.tokenizer is None and datamodule is not None:
            self.tokenizer = getattr(datamodule, "tokenizer", None)
            self.chat_template = getattr(datamodule, "chat_template", None)
        if self.federated.enabled and datamodule is not None and hasattr(datamodule, "shard"):
            datamodule.shard(self.federated.clients, self.held_clients())

    def held_clients(self) -> list[int]:
        """The federation's clients this process holds: all of them in one process, one under torchrun/tcp."""
        return self.federation.held()

    def use(self, client: FederatedClient) -> None:
        """Put ``client``'s trainable tensors into the bottom and top and talk to the trunk as it."""
        self.federation.use(client)

    def _federated_step(self, batches: dict[int, dict[str, torch.Tensor]]) -> torch.Tensor:
        """One optimizer step of every held client (manual optimization); see :mod:`splittrain.federated`."""
        losses = self.federation.step(self.global_step, batches, self._client_loss)
        self.optimizers().step()  # Lightning counts the step on its clock
        loss = torch.stack(losses).mean() if losses else torch.zeros(())
        self._stats["tokens"] = self.federation.tokens
        if losses:
            self._stats["losses"].append(loss.item())
            self._record("train_loss", self._stats["losses"][-1], self.global_step)  # counted: steps done
        self.log("train_loss", loss, prog_bar=True, logger=False)
        return loss

    def _client_loss(self, index: int, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The client in use's training loss on ``batch``, backed (its gradients accumulate), recorded, detached."""
        loss, self._pipeline = self._train_loss(batch, ("train", self.global_step, 0), self.global_step)
        self.manual_backward(loss)  # a pipelined batch finishes there (see backward)
        self._record(f"train_loss/client{index}", loss.item(), self.global_step + 1)
        return loss.detach()

    def client_summaries(self, trainer: L.Trainer, datamodule: Any) -> dict[str, dict[str, Any]]:
        """Per client: tokens trained, first/last train loss, its loss curve and validation loss on its own
        validation shard. Under torchrun the figures of every client rank are gathered in the clients' group."""
        return self.federation.summaries(self, trainer, datamodule)

    @torch.no_grad()
    def generate(self, messages_or_prompts: str | Sequence[Any], *, batch_size: int = 16, streamer: Any = None,
                 progress: bool = False, **options: Any) -> str | list[str]:
        """Answer through the split model: a user message (``str``) or a conversation (a list of ``{"role",
        "content"}`` ending with the user's turn) gives one answer; a list of them a list of answers. Each party
        keeps a KV cache for its own layers (the trunk's on the server). ``options``: those of
        :class:`~splittrain.generate.GenerationOptions` (``max_new_tokens``, ``do_sample``, ``temperature``,
        ``top_k``, ``top_p``, ``repetition_penalty``, ``stop_strings``, ``seed``, ...). In a federation this is
        the weights of the client in use (the first held one)."""
        from .generate import answer

        if self.tokenizer is None:
            raise ValueError("generate needs a tokenizer: attach the module to a trainer with the datamodule, or "
                             "set module.tokenizer")
        self.configure_model()
        was_training = self.training
        self.eval()
        try:
            return answer(self.crossing, self.tokenizer, messages_or_prompts, batch_size=batch_size, streamer=streamer,
                          progress=progress, chat_template=self.chat_template, **options)
        finally:
            self.train(was_training)

    def restore(self, path: str | Path, force_trunk: bool = False) -> None:
        """Load a ``fit`` checkpoint outside a trainer's loop (``generate``): the client's trainable tensors, and
        the trunk server loads its own state of the same step (``force_trunk``: even while other clients of a
        federation train that trunk)."""
        checkpoint = load_state(path)
        self._force_trunk_load = force_trunk
        try:
            self.on_load_checkpoint(checkpoint)
        finally:
            self._force_trunk_load = False
        result = self.load_state_dict(checkpoint["state_dict"], strict=False)
        if result.unexpected_keys:
            raise ValueError(f"checkpoint {path} holds tensors this model does not have, e.g. "
                             f"{result.unexpected_keys[:3]}: was it written with another model or cuts?")

    def forward(self, batch: dict[str, torch.Tensor], key: tuple = ("eval", 0), step: int | None = None) -> Any:
        """bottom -> trunk (across the cut) -> top; returns the top's output (``logits``, ``loss``). A training pass
        tells the server the client's optimizer ``step`` (default: Lightning's count)."""
        return self.crossing.forward(batch, key, self.global_step if step is None else step)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.federated.enabled:
            return self._federated_step(batch)
        loss, self._pipeline = self._train_loss(batch, ("train", self.global_step, batch_idx), self.global_step)
        self.log("train_loss", loss, prog_bar=True, logger=False, batch_size=batch["input_ids"].shape[0])
        self._stats["tokens"] += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
        self._stats["losses"].append(loss.item())
        self._record("train_loss", self._stats["losses"][-1], self.global_step + 1)
        return loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._window is None or self._window[0] != self.global_step:  # the first batch of a step
            self._window = (self.global_step, time.perf_counter(), self._stats["tokens"], self._wire_bytes())

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._window is not None and self.global_step > self._window[0]:
            self._log_step()

    def _log_step(self) -> None:
        """After an optimizer step, to the loggers (on the beat of ``log_every_n_steps``, and at the run's last step
        so that the logs end where summary.json does): the train loss (and each client's that took part in a
        federation), both sides' learning rates as the step left them, the step's tokens per second and the bytes
        it moved across the cuts. Logged here rather than with ``self.log``, which would repeat a client's last
        loss at the steps it sat out."""
        _, clock, tokens, wire = self._window
        self._window = None
        step, trainer = self.global_step, self.trainer
        seconds = time.perf_counter() - clock
        for name, value in self._learning_rates().items():
            self._record(name, value, step)
        beat = trainer.log_every_n_steps
        if not self.loggers or not beat or (step % beat and not trainer.should_stop
                                            and step < trainer.estimated_stepping_batches):
            return
        figures = {name: series[step] for name, series in self.history.items()
                   if step in series and not name.startswith("val_")}
        figures.update(tokens_per_second=(self._stats["tokens"] - tokens) / seconds if seconds > 0 else 0.0,
                       wire_bytes_per_step=float(self._wire_bytes() - wire), epoch=self.current_epoch)
        for logger in self.loggers:  # Lightning's step of the N-th optimizer step: N - 1
            logger.log_metrics(figures, step=step - 1)
            logger.save()

    def _learning_rates(self) -> dict[str, float]:
        """``lr/client``, the client's learning rate (the first held client's in a federation), and ``lr/trunk``,
        the trunk's as the server's last step reply gave it."""
        if self.clients:
            optimizer, trunk = self.clients[min(self.clients)].optimizer, self.federation.trunk_lr
        else:
            optimizer, trunk = self.trainer.optimizers[0], self._trunk_lr
        rates = {"lr/client": float(optimizer.param_groups[0]["lr"])}
        if trunk is not None:
            rates["lr/trunk"] = float(trunk)
        return rates

    def _wire_bytes(self) -> int:
        """Bytes the transport has moved so far, over every held client's link."""
        return sum(link.wire_bytes for link in self.federation.links(self.crossing))

    def _record(self, name: str, value: float, step: int) -> None:
        """Keep ``value`` of ``name`` at ``step`` (optimizer steps done) in :attr:`history`."""
        self.history.setdefault(name, {})[step] = float(value)

    def _train_loss(self, batch: dict[str, torch.Tensor], key: tuple, step: int) -> tuple[torch.Tensor, Pipeline | None]:
        """The training loss of ``batch`` (the training metrics updated); pipelined (``pipeline`` > 1) also the
        :class:`~splittrain.cut.Pipeline` to ``finish()`` after the loss's backward pass."""
        return self.crossing.loss(batch, self.pipeline, key, step,
                                  lambda out, chunk: self.train_metrics.update_output(out, chunk["labels"]))

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """Backward through the top (dL/dh leaves for the trunk); a pipelined batch then backs the returned
        dL/dh_in through the bottom."""
        super().backward(loss, *args, **kwargs)
        if self._pipeline is not None:
            pipeline, self._pipeline = self._pipeline, None
            pipeline.finish()

    def on_train_epoch_end(self) -> None:
        self.log_dict({f"train_{k}": v for k, v in self.train_metrics.compute().items()})
        self.train_metrics.reset()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """The batch's loss (the validation metrics updated), pipelined as training is."""
        loss = self.crossing.evaluate(batch, self.pipeline, ("val", self.global_step, batch_idx),
                                      lambda out, chunk: self.val_metrics.update_output(out, chunk["labels"]))
        self.log(f"val_loss{self._suffix}", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def on_validation_epoch_end(self) -> None:
        self.log_dict({f"val_{k}{self._suffix}": v for k, v in self.val_metrics.compute().items()}, prog_bar=True)
        self.val_metrics.reset()

    def on_validation_end(self) -> None:
        name = f"val_loss{self._suffix}"
        if not self.trainer.sanity_checking and name in self.trainer.callback_metrics:
            self._record(name, self.trainer.callback_metrics[name].item(), self.global_step)

    @contextmanager
    def validating_client(self, index: int) -> Iterator[None]:
        """Validation inside logs its metrics as ``val_loss/client{index}`` and so on: a federated client's own
        validation shard."""
        self._suffix = f"/client{index}"
        try:
            yield
        finally:
            self._suffix = ""

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self(batch, key=("test", self.global_step, batch_idx))
        self.test_metrics.update_output(out, batch["labels"])
        self.log("test_loss", out.loss, batch_size=batch["input_ids"].shape[0])
        return out.loss

    def on_test_epoch_end(self) -> None:
        """Token metrics of the test rows, then the evaluation by answers generated with ``model.generation``
        (:func:`~splittrain.generate.evaluate_answers`; written to eval.json/md in the run folder)."""
        from .generate import evaluate_answers

        metrics = {f"test_{k}": float(v) for k, v in self.test_metrics.compute().items()}
        self.test_metrics.reset()
        self.log_dict(metrics)
        datamodule = self.trainer.datamodule
        if not hasattr(datamodule, "eval_rows"):
            return
        writes = self.trainer.is_global_zero and 0 in self.held_clients()
        answer = partial(self.generate, progress=True, **asdict(self.generation))
        self.last_eval = evaluate_answers(answer, datamodule.eval_rows("test", self.eval_max_rows), metrics,
                                          self.run_dir if writes else None)
        scores = self.last_eval["metrics"]
        self.log_dict({f"test_{k}": v for k, v in scores.items() if k in ("exact_match", "rouge_l", "bleu")})

    def configure_optimizers(self):
        if self.federated.enabled:
            # Each client has its own AdamW; Lightning counts steps on a clock without parameters, stepped each step.
            self.federation.build(self.crossing, lambda index: self._connect(f"client{index}"), self.trainer.datamodule,
                                  self.optim, self._total_steps())
            return torch.optim.SGD([torch.nn.Parameter(torch.zeros(0))], lr=0.0)
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            # A frozen client still needs Lightning to reach optimizer_step, where the trunk steps.
            params = [torch.nn.Parameter(torch.zeros(0))]
        optimizer, scheduler = build_optimizer(params, self.optim, self._total_steps())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Global-norm clipping across both parties: the total norm includes the trunk's gradients."""
        if not gradient_clip_val:
            return
        if gradient_clip_algorithm not in (None, "norm"):
            raise ValueError("split training clips by global norm only (gradient_clip_algorithm='norm')")
        self._trunk_scale = self.crossing.clip_gradients(self.parameters(), gradient_clip_val)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        self._trunk_scale = None
        step = self.global_step + 1  # the step this call makes (Lightning counts it once the hook returns)
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self._trunk_lr = self.crossing.link.step(step, self._trunk_scale).get("lr")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only the client's trainable tensors and have the trunk save its own state beside."""
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        if self.defense is not None:
            checkpoint["privacy"] = self.defense.state_dict()
        tag = f"step-{self.global_step}"
        checkpoint["trunk_checkpoint"] = tag
        checkpoint["trunk_file"] = self.crossing.link.save(tag)["file"]
        checkpoint["wire_feedback"] = self.crossing.link.feedback.state_dict()
        if self.clients:  # every held client's own tensors, optimizer, schedule and figures
            checkpoint["federated"] = self.federation.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.configure_model()
        self.crossing.link.load(checkpoint["trunk_checkpoint"], force=getattr(self, "_force_trunk_load", False))
        self.crossing.link.feedback.load_state_dict(checkpoint.get("wire_feedback", {}))
        if self.defense is not None and "privacy" in checkpoint:
            self.defense.load_state_dict(checkpoint["privacy"])
        if self.federated.enabled:
            self.federation.resume(checkpoint)

    def client_adapters(self) -> dict[str, torch.Tensor]:
        """The client's LoRA tensors (empty unless ``client="lora"``)."""
        return {**adapter_state_dict(self.bottom), **adapter_state_dict(self.top)}

    @property
    def run_dir(self) -> Path:
        """The run folder (the trainer's ``default_root_dir``, whatever the loggers): checkpoints, trunk state,
        run.json, summary.json, curves.png."""
        return Path(self.trainer.default_root_dir)

    def on_fit_start(self) -> None:
        self._stats["began"] = time.perf_counter()
        if self.trainer.is_global_zero:
            manifest = {"model": resolve_model(self.model_name), "cuts": list(self.cuts),
                        "num_layers": self.top.config.num_hidden_layers, "client": self.client_mode,
                        "client_lora": asdict(self.client_lora), "trunk_lora": asdict(self.trunk_settings.lora)}
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / RUN_FILE).write_text(json.dumps(manifest, indent=2) + "\n")

    def on_train_start(self) -> None:
        """A federated client that rejoined a run in progress trains from the federation's step, its data from where
        it left it (:meth:`~splittrain.federated.client.FederatedClients.position`)."""
        self.federation.position(self.trainer)

    def fit_summary(self) -> dict[str, Any]:
        """Figures of the last fit: train losses (first, last, each micro-batch), steps, time, throughput, and the
        bytes the transport moved (frames with headers for tcp/dist; tensor bytes in process)."""
        seconds = time.perf_counter() - self._stats["began"] if self._stats["began"] else 0.0
        losses = self._stats["losses"]
        return {"train_loss_first": losses[0] if losses else math.nan,
                "train_loss_last": losses[-1] if losses else math.nan, "steps": self.global_step, "seconds": seconds,
                "tokens_per_second": self._stats["tokens"] / seconds if seconds else 0.0,
                "wire_bytes": sum(link.wire_bytes for link in self.federation.links(self.crossing)),
                "train_losses": losses}


def _check_arguments(quantization: str | None, embedding_quantization: str | None, client: str, cuts: Sequence[int],
                     transport: str, address: str | None, wire_dtype: str, pipeline: int, loss_chunk: int,
                     eval_max_rows: int | None, federated: FederatedSettings) -> None:
    """Refuse settings of :class:`ClientModule` that cannot work, before any weight loads."""
    if quantization and client == "full":
        raise UserError(f"model.quantization {quantization} freezes the client's base weights, and client: full "
                        "trains them: use client: lora (or frozen) with a quantized base, or no quantization")
    if embedding_quantization and client == "full":
        raise UserError(f"model.embedding_quantization {embedding_quantization} freezes the client's embedding and "
                        "head, and client: full trains them: use client: lora (or frozen), or no embedding "
                        "quantization")
    if pipeline < 1:
        raise ValueError(f"pipeline is the number of micro-batches per batch (>= 1), got {pipeline}")
    if loss_chunk < 0:
        raise ValueError(f"loss_chunk is the number of positions per chunk of the loss (0: off), got {loss_chunk}")
    if len(cuts) != 2:
        raise ValueError(f"the client holds bottom and top of a three-part split: give two cuts, got {cuts}")
    if client not in ("frozen", "lora", "full"):
        raise ValueError(f"client must be 'frozen', 'lora' or 'full', got {client!r}")
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown transport {transport!r}; available: {', '.join(TRANSPORTS)}")
    if transport == "tcp" and not address:
        raise ValueError("transport 'tcp' needs the server's address: --model.address HOST:PORT")
    check_wire_dtype(wire_dtype)
    if eval_max_rows is not None and eval_max_rows < 1:
        raise ValueError(f"eval_max_rows must be >= 1 or null (every row), got {eval_max_rows}")
    if federated.enabled and transport == "tcp" and federated.client_index is None:
        raise ValueError("a federated tcp client says which client it is: --model.federated.client_index I")


def _read_token(token_file: str | None) -> str | None:
    """The client's token: the content of ``token_file``, else the ``SPLITTRAIN_TOKEN`` environment variable."""
    if token_file:
        token = Path(token_file).expanduser().read_text().strip()
        if not token:
            raise UserError(f"token file {token_file} is empty")
        return token
    return os.environ.get(TOKEN_ENV) or None


def _recipe_defaults(recipe: RecipeName | None, client_lora: LoraSettings,
                     trunk: TrunkSettings) -> tuple[Recipe | None, LoraSettings, TrunkSettings]:
    """The recipe named (None: none) and both parties' LoRA settings with its targets where they name none."""
    if recipe is None:
        return None, client_lora, trunk
    from recipes import get_recipe

    found = get_recipe(recipe)
    targets = list(found.lora_targets)
    client_lora = client_lora if client_lora.targets else replace(client_lora, targets=targets)
    if not trunk.lora.targets:
        trunk = replace(trunk, lora=replace(trunk.lora, targets=targets))
    return found, client_lora, trunk


class SafetensorsCheckpointIO(CheckpointIO):
    """Lightning checkpoints as one safetensors file (tensors + JSON structure): nothing is pickled.

    The file keeps Lightning's name (``last.ckpt``, ``epoch=0-step=50.ckpt``) so ``--ckpt_path last`` works.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        save_state(checkpoint, path)

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        return load_state(path)

    def remove_checkpoint(self, path) -> None:
        Path(path).unlink(missing_ok=True)
