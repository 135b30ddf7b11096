"""Instruction data for chat fine-tuning: rows -> messages -> chat template -> ids with assistant-only labels.

Three row shapes are understood (see :func:`to_messages`): ``messages`` (a list of role/content dicts), alpaca
(``instruction``, ``input``, ``output``) and ``prompt``/``completion``. A conversation is rendered with the
tokenizer's chat template (or a fallback: a recipe's, one of :data:`~splittrain.chat_templates.CHAT_TEMPLATES`)
and only the assistant turns carry labels, each through its end-of-turn token. :func:`render` prints which tokens are
trained: look at it before training.

From YAML (LightningCLI)::

    data:
      train: data/train.jsonl
      tokenizer: Qwen/Qwen2-0.5B-Instruct
      max_length: 512

Local ``.jsonl``/``.json`` files are checked line by line before ``datasets`` reads them (:func:`check_rows_file`):
a line that is not JSON, not an object, not one of the three row shapes or without an assistant turn is refused as
``file:line: what is wrong``, with the count of other bad lines; nothing is skipped silently.

Federated clients each train on their own disjoint shard of the rows: :func:`~splittrain.federated.partition.partition`
draws the shards (iid, label skew from a Dirichlet, or one client per value of a column) and
:meth:`InstructionDataModule.shard` applies them.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from functools import partial
from itertools import groupby
from pathlib import Path
from typing import IO, Any, Literal

import lightning as L
import torch
import transformers
from datasets import load_dataset
from datasets.fingerprint import Hasher
from torch.utils.data import DataLoader, Sampler
from transformers import AutoTokenizer

from recipes import NAMES as RECIPE_NAMES, chat_template_for, pad_token_id

from .chat_templates import CHAT_TEMPLATES
from .errors import UserError
from .federated.partition import PartitionMethod, check_clients, check_partition, partition

IGNORE_INDEX = -100  # label value that torch's cross-entropy skips

def to_messages(row: Mapping[str, Any]) -> list[dict[str, str]]:
    """One data row as ``[{"role": ..., "content": ...}, ...]`` with at least one assistant turn.

    Accepts ``messages``; alpaca ``instruction`` + optional ``input`` + ``output`` (+ optional ``system``);
    ``prompt`` + ``completion`` (+ optional ``system``). A key whose value is null counts as absent (``datasets`` fills
    the columns of other rows' shapes with nulls). Raises :class:`~splittrain.errors.UserError` (a ``ValueError``)
    naming the row's keys otherwise.
    """
    if row.get("messages") is not None:
        if not isinstance(row["messages"], Sequence) or isinstance(row["messages"], str):
            raise UserError(f"row with keys {_keys(row)}: 'messages' must be a list of role/content objects, got "
                            f"{type(row['messages']).__name__}")
        messages = [_message(m, row) for m in row["messages"]]
    elif row.get("instruction") is not None and row.get("output") is not None:
        _strings(row, "instruction", "output", "input", "system")
        user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        messages = _with_system(row, [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}])
    elif row.get("prompt") is not None and row.get("completion") is not None:
        _strings(row, "prompt", "completion", "system")
        messages = _with_system(row, [{"role": "user", "content": row["prompt"]},
                                      {"role": "assistant", "content": row["completion"]}])
    else:
        raise UserError(f"row with keys {_keys(row)} is not an instruction row: expected 'messages', alpaca "
                        "('instruction', optional 'input', 'output') or 'prompt'/'completion'")
    if not any(m["role"] == "assistant" for m in messages):
        roles = ", ".join(dict.fromkeys(m["role"] for m in messages)) or "none"
        raise UserError(f"row with keys {_keys(row)} has no assistant turn (roles: {roles}): nothing to train on")
    return messages


def check_row(row: Any) -> list[dict[str, str]]:
    """:func:`to_messages` of a row that can be trained on: a JSON object of one of the three shapes, with an
    assistant turn that is not the first turn. Raises :class:`~splittrain.errors.UserError` saying what is wrong."""
    if not isinstance(row, Mapping):
        raise UserError(f"a row must be a JSON object, got {_json_type(row)}")
    messages = to_messages(row)
    if messages[0]["role"] == "assistant":
        raise UserError(f"row with keys {_keys(row)} starts with an assistant turn: it has no prompt to answer")
    return messages


def check_rows_file(path: str | Path, limit: int | None = None) -> bool:
    """Check a local ``.jsonl`` (or ``.json``) file of rows before ``datasets`` reads it: every line JSON, every row
    :func:`check_row`'s (the first ``limit`` rows' shapes only; JSON everywhere, as ``datasets`` parses it all).

    Raises :class:`~splittrain.errors.UserError` as ``file:line: what is wrong`` (``file: row N`` in a JSON array)
    for the first bad line, with the count of the others; and when the file holds no row. Returns False when the
    file is one JSON document that is not a list of rows (e.g. columns): ``datasets`` reads it and the loaded rows
    are checked instead.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start})") from error
    entries: list[tuple[str, Any]] = []  # ("line N" or "row N", the row or its JSON error)
    document: Any = None
    if path.suffix == ".json":
        try:
            document = json.loads(text)
        except json.JSONDecodeError as error:
            if text.lstrip().startswith("["):  # one JSON document after all, broken
                raise UserError(f"{path}:{error.lineno}: not valid JSON ({error.msg} at column {error.colno})") from None
            document = None  # JSON Lines in a .json file, which datasets reads too
        if isinstance(document, dict) and document and all(isinstance(v, list) for v in document.values()):
            return False  # columns: datasets reads them, the loaded rows are checked
        if isinstance(document, list):
            entries = [(f"row {number}", row) for number, row in enumerate(document, 1)]
        elif isinstance(document, dict):
            entries = [("row 1", document)]
        elif document is not None:
            raise UserError(f"{path} holds a JSON {_json_type(document)}: expected one row (a JSON object) per line, "
                            "or a list of rows")
    if document is None:
        for number, line in enumerate(text.split("\n"), 1):  # not splitlines: JSON strings may hold U+2028
            if not line.strip():
                continue  # datasets skips blank lines
            try:
                entries.append((f"line {number}", json.loads(line)))
            except json.JSONDecodeError as error:
                entries.append((f"line {number}", error))
    if not entries:
        raise UserError(f"{path} holds no rows" + (" (it is empty)" if not text.strip() else ""))
    problems = []
    for index, (where, row) in enumerate(entries):
        if isinstance(row, json.JSONDecodeError):
            problems.append((where, f"not valid JSON ({row.msg} at column {row.colno})"))
        elif limit is None or index < limit:
            try:
                check_row(row)
            except UserError as error:
                problems.append((where, str(error)))
    if problems:
        (where, what), others = problems[0], [w.split()[-1] for w, _ in problems[1:]]
        place = f"{path}:{where.split()[-1]}" if where.startswith("line") else f"{path}: {where}"
        more = "" if not others else (f" ({len(others)} more bad {where.split()[0]}{'s' if len(others) > 1 else ''}: "
                                      f"{', '.join(others[:5])}{', ...' if len(others) > 5 else ''})")
        raise UserError(f"{place}: {what}{more}")
    return True


def fold_system(messages: Sequence[Mapping[str, str]], trim: bool = False) -> list[dict[str, str]]:
    """A leading system message merged into the first user turn (``system + "\\n\\n" + user``), for chat formats
    without a system role (Gemma); other conversations are returned as they are.

    ``trim`` strips the user's text first, for templates that trim each turn's content (Gemma's and Gemma-3's
    official ones, see :func:`template_trims`): the folded turn then renders as Gemma-3's official template renders
    the system message and the user turn (``"Be brief.\\n\\nHi"`` from ``"  Hi "``), whose system text is not trimmed
    (only its leading whitespace is lost to the template's trim of the whole folded turn)."""
    messages = [dict(m) for m in messages]
    if len(messages) > 1 and messages[0]["role"] == "system" and messages[1]["role"] == "user":
        system = messages.pop(0)
        user = messages[0]["content"].strip() if trim else messages[0]["content"]
        messages[0]["content"] = f"{system['content']}\n\n{user}"
    return messages


def template_trims(tokenizer: Any, chat_template: str) -> bool:
    """Whether ``chat_template`` strips the whitespace around a user turn's content (Jinja ``| trim``), found by
    rendering one user turn padded with spaces."""
    probe = "splittrain-probe"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": f"  {probe}  "}], chat_template=chat_template,
                                             tokenize=False)
    except Exception:  # a template that refuses a lone user turn: nothing to learn from it
        return False
    return probe in text and f"  {probe}  " not in text


def _keys(row: Mapping[str, Any]) -> list[str]:
    return sorted(k for k, v in row.items() if v is not None)


def _json_type(value: Any) -> str:
    return {str: "string", list: "list", dict: "object", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


def _strings(row: Mapping[str, Any], *keys: str) -> None:
    for key in keys:
        if row.get(key) is not None and not isinstance(row[key], str):
            raise UserError(f"row with keys {_keys(row)}: {key!r} must be a string, got {_json_type(row[key])}")


def _message(message: Any, row: Mapping[str, Any]) -> dict[str, str]:
    if not (isinstance(message, Mapping) and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)):
        raise UserError(f"row with keys {_keys(row)}: every message needs a string 'role' and 'content', "
                        f"got {message!r}")
    return {"role": message["role"], "content": message["content"]}


def _with_system(row: Mapping[str, Any], messages: list[dict[str, str]]) -> list[dict[str, str]]:
    return ([{"role": "system", "content": row["system"]}] if row.get("system") else []) + messages


def resolve_chat_template(tokenizer: Any, fallback: str | None) -> str:
    """The Jinja template to render with: the tokenizer's own, else ``fallback``: a :data:`CHAT_TEMPLATES` name, a
    recipe name (``qwen2``, ``gemma``, ``gemma3``: the official instruct format, see :mod:`recipes`) or a raw
    template string. Raises ``ValueError`` when there is neither."""
    if fallback in RECIPE_NAMES:
        return chat_template_for(tokenizer, fallback)
    if tokenizer.chat_template:
        return tokenizer.get_chat_template()
    if fallback is not None:
        return CHAT_TEMPLATES.get(fallback, fallback)
    raise UserError(f"tokenizer {tokenizer.name_or_path!r} has no chat template and no fallback was given: pass "
                    f"chat_template= one of {sorted(CHAT_TEMPLATES)}, a recipe ({', '.join(RECIPE_NAMES)}) or a "
                    "Jinja template string "
                    "(in YAML: data.chat_template)")


def tokenize_conversation(tokenizer: Any, messages: Sequence[Mapping[str, str]], max_length: int | None = None,
                          chat_template: str | None = None) -> dict[str, list[int]]:
    """``{"input_ids", "labels"}`` of one conversation; labels are ``IGNORE_INDEX`` except on assistant turns.

    An assistant turn is what the template adds between the prompt with the generation header and the render that
    includes the turn, up to and including its last special token (the end-of-turn token, which the model must learn
    to emit); what follows that token (the newline before the next turn) is not trained. Truncated to
    ``max_length`` tokens. Needs a fast tokenizer (character offsets).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"tokenizer {type(tokenizer).__name__} is not a fast tokenizer: label masking needs offsets")
    template = resolve_chat_template(tokenizer, chat_template)

    def rendered(part: Sequence[Mapping[str, str]], generation_prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(part, chat_template=template, tokenize=False,
                                             add_generation_prompt=generation_prompt)

    text = rendered(messages)
    special = sorted(set(tokenizer.all_special_tokens)
                     | {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}, key=len, reverse=True)
    special_token = re.compile("|".join(map(re.escape, special))) if special else None
    spans: list[tuple[int, int]] = []  # character ranges of `text` that are trained
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if index == 0:
            raise ValueError("conversation starts with an assistant turn: it has no prompt to answer")
        prompt, through = rendered(messages[:index], generation_prompt=True), rendered(messages[:index + 1])
        # Incremental rendering only finds the turn if each render extends the previous one.
        if not (through.startswith(prompt) and text.startswith(through)):
            raise ValueError(f"the chat template does not render conversations prefix by prefix (assistant turn "
                             f"{index}): {prompt!r} + turn is not a prefix of {text!r}. Templates that rewrite earlier "
                             "turns (e.g. drop reasoning) need a different template for training: pass chat_template=")
        turn = through[len(prompt):]
        ends = [m.end() for m in special_token.finditer(turn)] if special_token else []
        spans.append((len(prompt), len(prompt) + (ends[-1] if ends else len(turn))))

    # The template writes bos itself when the family uses one: do not add special tokens again.
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoded["input_ids"])
    labels = [token if any(start <= offset[0] < end for start, end in spans) else IGNORE_INDEX
              for token, offset in zip(input_ids, encoded["offset_mapping"])]
    return {"input_ids": input_ids[:max_length], "labels": labels[:max_length]}


def render(tokenizer: Any, row_or_messages: Mapping[str, Any] | Sequence[Mapping[str, str]],
           chat_template: str | None = None, file: IO[str] | None = None) -> str:
    """The rendered conversation with trained tokens inside ``[[...]]`` and a count line; printed to ``file``
    (stdout by default) and returned."""
    messages = to_messages(row_or_messages) if isinstance(row_or_messages, Mapping) else row_or_messages
    example = tokenize_conversation(tokenizer, messages, chat_template=chat_template)
    pieces = []
    for trained, run in groupby(zip(example["input_ids"], example["labels"]), key=lambda p: p[1] != IGNORE_INDEX):
        text = tokenizer.decode([token for token, _ in run], skip_special_tokens=False,
                                clean_up_tokenization_spaces=False)
        pieces.append(f"[[{text}]]" if trained else text)
    trained_count = sum(label != IGNORE_INDEX for label in example["labels"])
    shown = "".join(pieces) + f"\n-- {trained_count} of {len(example['labels'])} tokens trained (inside [[...]])"
    print(shown, file=file if file is not None else sys.stdout)
    return shown


def pack_rows(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Example indices grouped into rows of at most ``max_length`` tokens, in order (next fit): a row closes when
    the next example does not fit. Examples longer than ``max_length`` count as ``max_length`` (truncated)."""
    rows: list[list[int]] = []
    used = max_length  # forces a new row for the first example
    for index, length in enumerate(lengths):
        length = min(length, max_length)
        if used + length > max_length:
            rows.append([])
            used = 0
        rows[-1].append(index)
        used += length
    return rows


def collate(examples: Sequence[Mapping[str, Sequence[int]]], pad_token_id: int, packing: bool = False,
            max_length: int | None = None) -> dict[str, torch.Tensor]:
    """A batch of LongTensors from tokenized examples, right-padded to the longest row.

    Without packing: ``input_ids``, ``attention_mask``, ``labels`` (``IGNORE_INDEX`` on padding). With packing:
    examples are concatenated into rows of at most ``max_length`` tokens (:func:`pack_rows`) and the batch has
    ``input_ids``, ``labels``, ``position_ids`` restarting at 0 for each example and no ``attention_mask``:
    transformers then keeps attention inside each example (only without a KV cache: call the model with
    ``use_cache=False``, else it ignores the packing and attends across examples). The first token of every example has label
    ``IGNORE_INDEX`` so no loss term predicts one example from the previous one.
    """
    if not packing:
        longest = max(len(e["input_ids"]) for e in examples)
        batch = {"input_ids": torch.full((len(examples), longest), pad_token_id, dtype=torch.long),
                 "attention_mask": torch.zeros(len(examples), longest, dtype=torch.long),
                 "labels": torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)}
        for row, example in enumerate(examples):
            length = len(example["input_ids"])
            batch["input_ids"][row, :length] = torch.tensor(example["input_ids"])
            batch["attention_mask"][row, :length] = 1
            batch["labels"][row, :length] = torch.tensor(example["labels"])
        return batch

    if max_length is None:
        raise ValueError("packing needs max_length (the length of a packed row)")
    rows = []
    for indices in pack_rows([len(examples[i]["input_ids"]) for i in range(len(examples))], max_length):
        ids, labels, positions = [], [], []
        for index in indices:
            example_ids = list(examples[index]["input_ids"][:max_length])
            ids += example_ids
            labels += [IGNORE_INDEX] + list(examples[index]["labels"][1:len(example_ids)])
            positions += range(len(example_ids))
        rows.append((ids, labels, positions))
    longest = max(len(ids) for ids, _, _ in rows)
    batch = {"input_ids": torch.full((len(rows), longest), pad_token_id, dtype=torch.long),
             "labels": torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long),
             # Padding gets its own run of positions, i.e. it is one more (untrained) packed sequence.
             "position_ids": torch.arange(longest).repeat(len(rows), 1)}
    for row, (ids, labels, positions) in enumerate(rows):
        batch["input_ids"][row, :len(ids)] = torch.tensor(ids)
        batch["labels"][row, :len(ids)] = torch.tensor(labels)
        batch["position_ids"][row, :len(ids)] = torch.tensor(positions)
        batch["position_ids"][row, len(ids):] = torch.arange(longest - len(ids))
    return batch


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of example indices in a seeded order per epoch, able to start mid-epoch (resume).

    Plain batches chunk a permutation drawn from (seed, epoch). With ``rows`` (packing), the packed batches are
    fixed and only their order is drawn per epoch. Lightning calls :meth:`set_epoch` at every epoch start (through
    :attr:`sampler`).
    """

    def __init__(self, size: int, batch_size: int, shuffle: bool, seed: int,
                 fixed_batches: list[list[int]] | None = None) -> None:
        self.size, self.batch_size, self.shuffle, self.seed = size, batch_size, shuffle, seed
        self.fixed_batches = fixed_batches
        self.epoch = 0
        self.start = 0  # batches to skip once, set by a resumed loader

    @property
    def sampler(self) -> EpochBatchSampler:
        """Itself: Lightning sets the epoch of a loader's ``sampler`` and ``batch_sampler.sampler``, never of the
        batch sampler, so without this every epoch would repeat the first one's order."""
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self, n: int) -> list[int]:
        if not self.shuffle:
            return list(range(n))
        return torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)).tolist()

    def batches(self) -> list[list[int]]:
        if self.fixed_batches is not None:
            return [self.fixed_batches[i] for i in self._order(len(self.fixed_batches))]
        order = self._order(self.size)
        return [order[i:i + self.batch_size] for i in range(0, self.size, self.batch_size)]

    def __iter__(self) -> Iterator[list[int]]:
        start, self.start = self.start, 0
        return iter(self.batches()[start:])

    def __len__(self) -> int:
        return len(self.fixed_batches) if self.fixed_batches is not None else -(-self.size // self.batch_size)


def packed_batches(lengths: Sequence[int], batch_size: int, max_length: int, shuffle: bool, seed: int) -> list[list[int]]:
    """Example indices of each packed batch: ``batch_size`` consecutive rows of next-fit packing.

    Rows are formed once over a seeded shuffle; :func:`collate`'s packing rebuilds exactly these rows.
    """
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist() if shuffle else \
        list(range(len(lengths)))
    rows = [[order[i] for i in row] for row in pack_rows([lengths[i] for i in order], max_length)]
    return [sum(rows[start:start + batch_size], []) for start in range(0, len(rows), batch_size)]


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position Lightning keeps in checkpoints (``state_dict``), so a run resumed mid-epoch
    sees the same batches, in the same order, as an uninterrupted run."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.consumed = 0

    def __iter__(self) -> Iterator[Any]:
        self.consumed = self.batch_sampler.start
        for item in super().__iter__():
            self.consumed += 1
            yield item

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.batch_sampler.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.batch_sampler.set_epoch(int(state["epoch"]))
        self.batch_sampler.start = int(state["consumed"])


class InstructionDataModule(L.LightningDataModule):
    """Instruction rows from files or the hub, tokenized with a chat template and assistant-only labels.

    Tokenized examples keep ``row``, their index among the loaded rows (tokenization drops examples without trained
    tokens), so the row shards of :meth:`shard` select the right examples.
    """

    def __init__(self, train: str, tokenizer: str, val: str | None = None, chat_template: str | None = None,
                 max_length: int = 512, batch_size: int = 8, packing: bool = False, val_size: float = 0.1,
                 seed: int = 0, num_workers: int = 0, limit: int | None = None,
                 partition: PartitionMethod = "iid", partition_alpha: float = 0.5,
                 partition_column: str | None = None, test: str | None = None,
                 system: Literal["keep", "fold"] = "keep") -> None:
        """
        Args:
            train: ``quickstart`` (the embedded data set), or training rows: a local ``.jsonl``/``.json``/``.parquet`` file, or a dataset name (or local folder)
                for ``datasets.load_dataset``, optionally ``name:split`` (default split ``train``).
            tokenizer: ``quickstart``, ``tiny-<recipe>`` (a tiny recipe model's), or a tokenizer folder or hub id,
                loaded with ``transformers.AutoTokenizer``.
            val: Validation rows, same forms as ``train``; if None, ``val_size`` of ``train`` is held out.
            chat_template: Used when the tokenizer has no chat template: a name (``chatml``, ``gemma``) or a Jinja
                template string.
            max_length: Tokens per example (longer ones are truncated) and per packed row.
            batch_size: Examples per batch, or packed rows per batch with ``packing``.
            packing: Concatenate examples into rows of ``max_length`` tokens (attention stays within an example).
            val_size: Fraction of ``train`` held out for validation when ``val`` is None.
            seed: Seed of the validation split, of the training order and of the client shards.
            num_workers: DataLoader worker processes.
            limit: Use at most this many rows of each loaded source (quick experiments).
            partition: How :meth:`shard` splits the rows among federated clients (see :func:`partition`): ``iid``
                (random equal parts), ``dirichlet`` (label skew by ``partition_column``) or ``column`` (each value of
                ``partition_column`` to one client).
            partition_alpha: Dirichlet concentration of ``dirichlet``: smaller is more skewed.
            partition_column: Column of the rows that ``dirichlet`` and ``column`` split by (a label or task).
            test: Rows for ``test`` (perplexity and token accuracy, and answers generated for each row's last user
                turn scored against its last assistant turn), same forms as ``train``; default: the validation rows.
            system: ``fold`` merges a row's system message into its first user turn (for chat formats without a
                system role, e.g. Gemma's, whose template refuses one); ``keep`` leaves it to the template.
        """
        if system not in ("keep", "fold"):
            raise UserError(f"data.system must be 'keep' or 'fold', got {system!r}")
        super().__init__()
        check_partition(partition, partition_alpha, partition_column)
        train, val = _named_rows(train, val)
        tokenizer = _tokenizer_source(tokenizer)
        self.save_hyperparameters({"train": train, "tokenizer": tokenizer, "val": val, "chat_template": chat_template,
                                   "max_length": max_length, "batch_size": batch_size, "packing": packing,
                                   "val_size": val_size, "seed": seed, "num_workers": num_workers, "limit": limit,
                                   "partition": partition, "partition_alpha": partition_alpha,
                                   "partition_column": partition_column, "test": test, "system": system})
        _check_files_exist(train=train, val=val, test=test)  # fail now, not after loading the model
        self.tokenizer = _load_tokenizer(tokenizer)
        self.chat_template = resolve_chat_template(self.tokenizer, chat_template)  # fail now, not after loading data
        # Fold as the template renders: Gemma's templates trim each turn, so the user's text is trimmed before folding.
        self.trim_folded = system == "fold" and template_trims(self.tokenizer, self.chat_template)
        self.pad_token_id = pad_token_id(self.tokenizer)  # eos where there is no pad token (Llama)
        self.train_dataset: Any = None
        self.val_dataset: Any = None
        self.test_dataset: Any = None
        self.clients, self.held = 1, [0]  # see `shard`
        self._rows: dict[str, Any] = {}  # split -> the loaded rows, before tokenization
        self._shards: dict[str, list[list[int]]] = {}  # split -> positions in its tokenized dataset, per client

    def setup(self, stage: str | None = None) -> None:
        """Load and tokenize the rows (once)."""
        if self.train_dataset is not None:
            return
        hp = self.hparams
        # Every local file is checked before datasets reads any (its first read prints progress bars), and every
        # source is loaded before anything is tokenized: a bad test file fails before training.
        checked = {source: self._check_file(source) for source in (hp.train, hp.val, hp.test) if source is not None}
        train_rows = self._load(hp.train, checked.get(hp.train, False))
        val_rows = None if hp.val is None else self._load(hp.val, checked[hp.val])
        test_rows = None if hp.test is None else self._load(hp.test, checked[hp.test])
        if val_rows is None:
            try:
                split = train_rows.train_test_split(test_size=hp.val_size, seed=hp.seed)
            except ValueError as error:  # too few rows to hold out val_size of them
                raise UserError(f"data.val_size {hp.val_size} of the {len(train_rows)} rows of {hp.train} leaves no "
                                f"training or validation row ({_brief(error)}): give data.val, or more rows") \
                    from error
            train_rows, val_rows = split["train"], split["test"]
        self._rows = {"train": train_rows, "val": val_rows}
        self.train_dataset = self._tokenize(train_rows, hp.train)
        if len(self.train_dataset) == 0:
            raise UserError(f"no training row of {hp.train} keeps a trained token within data.max_length "
                            f"{hp.max_length}: the assistant turns start later; raise data.max_length")
        self.val_dataset = self._tokenize(val_rows, hp.val or hp.train)
        if test_rows is not None:
            self._rows["test"] = test_rows
            self.test_dataset = self._tokenize(test_rows, hp.test)
        else:
            self._rows["test"], self.test_dataset = val_rows, self.val_dataset
        self._split_shards()

    def shard(self, clients: int, held: Sequence[int] | None = None) -> None:
        """Split the training and the validation rows each into ``clients`` disjoint shards (:func:`partition` with
        this module's ``partition`` options and seed); this process trains the shards of ``held`` (default: all).

        Call before the dataloaders are built: with several clients :meth:`train_dataloader` gives one loader per
        held client. ``shard(1)`` is the unsharded default.
        """
        check_clients(clients)
        held = range(clients) if held is None else held
        if not held or not all(isinstance(c, int) and 0 <= c < clients for c in held):
            raise ValueError(f"held clients {list(held)} must be a non-empty selection of 0..{clients - 1}")
        self.clients, self.held = clients, sorted(set(held))
        if self.train_dataset is not None:
            self._split_shards()

    def _split_shards(self) -> None:
        self._shards = {}
        if self.clients == 1:
            return
        hp = self.hparams
        for split, examples in (("train", self.train_dataset), ("val", self.val_dataset)):
            try:
                shards = partition(self._rows[split], self.clients, hp.partition, hp.partition_alpha,
                                   hp.partition_column, hp.seed)
            except ValueError as error:
                raise UserError(f"sharding the {split} rows: {error}") from error
            position = {row: index for index, row in enumerate(examples["row"])}
            self._shards[split] = [[position[row] for row in shard if row in position] for shard in shards]
        if empty := [client for client in self.held if not self._shards["train"][client]]:
            raise UserError(f"clients {empty} have no training example left: tokenization drops the examples that "
                            "truncation to max_length leaves without trained tokens")

    def client_dataset(self, client: int, split: Literal["train", "val"]) -> Any:
        """The tokenized examples of ``client``'s shard of ``split`` (all of them while unsharded)."""
        if not 0 <= client < self.clients:
            raise ValueError(f"client {client} is not one of the {self.clients} clients 0..{self.clients - 1}")
        examples = {"train": self.train_dataset, "val": self.val_dataset}[split]
        return examples if self.clients == 1 else examples.select(self._shards[split][client])

    def client_loader(self, client: int, split: Literal["train", "val"], shuffle: bool) -> DataLoader:
        """A loader of :meth:`client_dataset`, its order seeded with ``seed + client``."""
        return self._loader(self.client_dataset(client, split), shuffle, self.hparams.seed + client)

    def _check_file(self, source: str) -> bool:
        """Check a local ``.jsonl``/``.json`` file line by line (:func:`check_rows_file`); False for other sources,
        whose rows :meth:`_load` checks once loaded."""
        if not _is_local_file(source):
            return False
        if not Path(source).is_file():
            raise UserError(_missing(source))
        return Path(source).suffix in {".jsonl", ".json"} and check_rows_file(source, self.hparams.limit)

    def _load(self, source: str, checked: bool | None = None) -> Any:
        """The rows of ``source``, checked (:func:`check_row`): a local ``.jsonl``/``.json`` file line by line before
        ``datasets`` reads it (:meth:`_check_file`, unless ``checked`` says whether it was), other sources once
        loaded. Raises :class:`~splittrain.errors.UserError` naming the source and the row."""
        from datasets.exceptions import DatasetGenerationError

        limit = self.hparams.limit
        path = Path(source)
        try:
            if checked is None:
                checked = self._check_file(source)
            if _is_local_file(source):
                rows = load_dataset("parquet" if path.suffix == ".parquet" else "json", data_files=str(path),
                                    split="train")
            else:
                name, _, split = source.partition(":")
                rows = load_dataset(name, split=split or "train")
        except (DatasetGenerationError, OSError, ValueError) as error:  # UserError is a ValueError too
            if isinstance(error, UserError):
                raise
            cause = error.__cause__ or error.__context__ or error
            raise UserError(f"cannot read the rows of {source}: {_brief(cause)}") from error
        if len(rows) == 0:
            raise UserError(f"{source} holds no rows")
        rows = rows if limit is None else rows.select(range(min(limit, len(rows))))
        if not checked:
            for number, row in enumerate(rows, 1):
                try:
                    check_row(row)
                except UserError as error:
                    raise UserError(f"{source}: row {number}: {error}") from None
        return rows

    def _tokenize(self, rows: Any, source: str | None = None) -> Any:
        encode = partial(_encode_row, tokenizer=self.tokenizer, max_length=self.hparams.max_length,
                         chat_template=self.chat_template, fold=self.hparams.system == "fold",
                         trim=getattr(self, "trim_folded", False), source=source or "the rows")
        # datasets fingerprints library functions by name only: hash this module's source and the transformers
        # version too, so changed tokenization code re-tokenizes instead of reusing a stale cache.
        if len(rows):
            encode(rows[0], 0)  # a template that refuses the rows' shape fails here, before the progress bars
        fingerprint = Hasher.hash([rows._fingerprint, encode, Path(__file__).read_text(), transformers.__version__])
        examples = rows.map(encode, with_indices=True, remove_columns=rows.column_names, desc="tokenizing",
                            new_fingerprint=fingerprint)
        # Truncation can cut every assistant token: such an example would only add a NaN/zero-token loss.
        return examples.filter(_has_trained_token, desc="dropping examples without trained tokens")

    def _loader(self, dataset: Any, shuffle: bool, seed: int) -> DataLoader:
        hp = self.hparams
        collate_fn = partial(collate, pad_token_id=self.pad_token_id, packing=hp.packing, max_length=hp.max_length)
        fixed = None
        if hp.packing:
            fixed = packed_batches([len(ids) for ids in dataset["input_ids"]], hp.batch_size, hp.max_length,
                                   shuffle=shuffle, seed=seed)
        sampler = EpochBatchSampler(len(dataset), hp.batch_size, shuffle, seed, fixed)
        return ResumableDataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn, num_workers=hp.num_workers)

    def ordered_loader(self, rows: str | Any, limit: int, seed: int) -> DataLoader:
        """Batches, in order, of the first ``limit`` examples of ``rows``: tokenized examples (``train_dataset``,
        ``val_dataset``) or a source of rows as ``train`` takes one (read, checked and tokenized here)."""
        examples = self._tokenize(self._load(rows)) if isinstance(rows, str) else rows
        return self._loader(examples.select(range(min(limit, len(examples)))), shuffle=False, seed=seed)

    def train_dataloader(self) -> DataLoader | dict[int, DataLoader]:
        """The training loader; after :meth:`shard` with several clients, ``{client: loader}`` for the held clients
        (Lightning combines them in "max_size_cycle" mode: a step gets ``{client: batch}``, shorter shards cycle)."""
        loaders = {client: self.client_loader(client, "train", shuffle=True) for client in self.held}
        return loaders if self.clients > 1 else loaders[0]

    def val_dataloader(self) -> DataLoader:
        """All validation rows, whatever the shards (a client's own: :meth:`client_loader`)."""
        return self._loader(self.val_dataset, shuffle=False, seed=self.hparams.seed)

    def test_dataloader(self) -> DataLoader:
        """The test rows (``test``; the validation rows when it is not given)."""
        return self._loader(self.test_dataset, shuffle=False, seed=self.hparams.seed)

    def eval_rows(self, split: Literal["val", "test"] = "test", limit: int | None = None) -> list[dict[str, Any]]:
        """Rows to answer: per row, ``messages`` up to its last user turn (earlier turns and system message kept)
        and ``reference``, the content of its last assistant turn. Rows without an assistant turn are skipped."""
        if split not in ("val", "test"):
            raise ValueError(f"split must be 'val' or 'test', got {split!r}")
        if not self._rows:
            self.setup("test")
        out = []
        for row in self._rows[split]:
            messages = to_messages(row)
            if self.hparams.system == "fold":
                messages = fold_system(messages, trim=self.trim_folded)
            last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
            if last is None or last == 0:
                continue
            out.append({"messages": messages[:last], "reference": messages[last]["content"]})
            if limit is not None and len(out) >= limit:
                break
        return out


def _encode_row(row: Mapping[str, Any], index: int, tokenizer: Any, max_length: int,
                chat_template: str, fold: bool = False, trim: bool = False, source: str = "the rows") -> dict[str, Any]:
    try:
        messages = fold_system(to_messages(row), trim=trim) if fold else to_messages(row)
        return {"row": index, **tokenize_conversation(tokenizer, messages, max_length=max_length,
                                                      chat_template=chat_template)}
    except Exception as error:  # a template's raise_exception (jinja2's TemplateError) or a ValueError of ours
        if not isinstance(error, ValueError) and type(error).__name__ != "TemplateError":
            raise
        hint = ("; data.system: fold merges a system message into the first user turn"
                if "system" in str(error).lower() and not fold else "")
        raise UserError(f"{source}: the chat template cannot render a row ({_brief(error)}){hint}") from error


def _named_rows(train: str, val: str | None) -> tuple[str, str | None]:
    """``train: quickstart`` names the embedded data set, whose own validation rows serve unless ``val`` is given;
    other sources are returned as they are."""
    if train != "quickstart":
        return train, val
    from .quickstart import TRAIN_FILE, VAL_FILE

    return str(TRAIN_FILE), val or str(VAL_FILE)


def _tokenizer_source(tokenizer: str) -> str:
    """The folder of the ``quickstart`` tokenizer (shipped, no model to build) and of a ``tiny-<recipe>`` model's;
    other names (a folder or a hub id) as they are."""
    from .quickstart import TOKENIZER_DIR, resolve_model

    return str(TOKENIZER_DIR) if tokenizer == "quickstart" else resolve_model(tokenizer)


def _check_files_exist(**sources: str | None) -> None:
    """Raise :class:`~splittrain.errors.UserError` for the first local data file of ``sources`` (``data.<name>``
    -> source) that is missing."""
    for name, source in sources.items():
        if source is not None and _is_local_file(source) and not Path(source).is_file():
            raise UserError(f"data.{name}: {_missing(source)}")


def _load_tokenizer(tokenizer: str) -> Any:
    """``AutoTokenizer`` of a folder or hub id; :class:`~splittrain.errors.UserError` when there is no such folder
    or it cannot be loaded."""
    if tokenizer.startswith(("/", ".", "~")) and not Path(tokenizer).expanduser().exists():
        raise UserError(f"data.tokenizer {tokenizer}: no such folder (a tokenizer folder or a hub id was expected)")
    try:
        return AutoTokenizer.from_pretrained(tokenizer)
    except (OSError, ValueError) as error:  # no such folder or hub id, or not a tokenizer
        raise UserError(f"data.tokenizer {tokenizer!r} cannot be loaded: {_brief(error)}") from error


def _is_local_file(source: str) -> bool:
    return Path(source).suffix in {".jsonl", ".json", ".parquet"}


def _missing(source: str) -> str:
    path = Path(source)
    if path.is_dir():
        return f"{source} is a folder; a .jsonl, .json or .parquet file was expected"
    return f"data file {source} does not exist" + (f" (nor its folder {path.parent})" if not path.parent.is_dir() else "")


def _brief(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines[:3]) if lines else type(error).__name__


def _has_trained_token(example: Mapping[str, Sequence[int]]) -> bool:
    return any(label != IGNORE_INDEX for label in example["labels"])
