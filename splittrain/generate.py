"""Split generation: bottom -> trunk -> top with one KV cache per segment, where that segment runs.

The client keeps a transformers ``DynamicCache`` for its bottom and one for its top; the trunk's cache lives
where the trunk runs: beside it in this process (a bare :class:`~splittrain.segments.Segment`), or on the trunk
server, which keeps one per generation session (bounded, freed when the generation ends, when the client's
session ends, or after ``ServerLimits.generation_timeout``). The prompt's activations cross the cut once; after
that one position per generated token crosses, with the attention mask's new column (each side keeps the mask
of the positions it has cached).

Decoding uses transformers' own logits processors and stopping criteria: greedy, temperature, top-k, top-p,
repetition penalty, min/max new tokens, stop strings and stop token ids, a seed. Prompts of different lengths
are left-padded, and positions are counted from each row's first real token, as ``GenerationMixin.generate``
does, so greedy split generation equals ``model.generate`` token for token.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import torch

from recipes import pad_token_id, stop_token_ids

from .crossing import Crossing
from .segments import Segment

if TYPE_CHECKING:
    from .privacy import Defense


@dataclass
class GenerationOptions:
    """How to decode (the names and meanings of transformers' ``GenerationConfig``)."""

    max_new_tokens: int = 64
    min_new_tokens: int = 0
    do_sample: bool = False
    """Sample from the (processed) distribution; greedy otherwise."""
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    stop_strings: list[str] = field(default_factory=list)
    """Stop a row once its text ends with one of these (needs the tokenizer)."""
    eos_token_id: list[int] | None = None
    """Stop token ids (default: the tokenizer's EOS and its end-of-turn token, see :func:`recipes.end_of_turn_tokens`)."""
    pad_token_id: int | None = None
    """Fills finished rows (default: the tokenizer's pad token, else the first stop token)."""
    seed: int | None = None
    """Seed of the sampling generator (``do_sample``); the global RNG when unset."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], "
                             f"got {self.min_new_tokens}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (use do_sample=False for greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if isinstance(self.stop_strings, str):
            self.stop_strings = [self.stop_strings]
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]

    @classmethod
    def of(cls, options: "GenerationOptions | None" = None, **overrides: Any) -> "GenerationOptions":
        """``options`` (or the defaults) with ``overrides`` (None leaves a value as is); unknown names are refused
        with the known ones."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown generation option(s) {unknown}; known: {sorted(names)}")
        base = {f.name: getattr(options, f.name) for f in fields(cls)} if options is not None else {}
        return cls(**{**base, **{k: v for k, v in overrides.items() if v is not None}})


# ---------------------------------------------------------------------------------------------- the trunk
class LocalTrunk:
    """A trunk segment in this process with its own KV cache and mask of the cached positions."""

    def __init__(self, trunk: Segment) -> None:
        from transformers import DynamicCache

        self.trunk, self.cache, self.mask = trunk, DynamicCache(config=trunk.config), None

    def __call__(self, hidden: torch.Tensor, new_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.mask = new_mask if self.mask is None else torch.cat([self.mask, new_mask], dim=1)
        device = self.trunk.device
        return self.trunk(hidden.to(device=device, dtype=self.trunk.dtype), attention_mask=self.mask.to(device),
                          position_ids=positions.to(device), cache=self.cache).hidden_states

    def close(self) -> None:
        self.cache = None


class RemoteTrunk:
    """The trunk on a server, reached through a :class:`~splittrain.cut.TrunkLink`; the server keeps the cache
    under a fresh generation id until :meth:`close`."""

    def __init__(self, link: Any) -> None:
        self.link, self.id, self.started = link, uuid.uuid4().hex, False

    def __call__(self, hidden: torch.Tensor, new_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.link.generate(self.id, not self.started, hidden, new_mask, positions)
        self.started = True
        return out.to(device=hidden.device, dtype=hidden.dtype)

    def close(self) -> None:
        if self.started:
            self.link.end_generation(self.id)
            self.started = False


def trunk_runner(trunk: Any) -> LocalTrunk | RemoteTrunk:
    """A trunk segment runs here; a :class:`~splittrain.cut.TrunkLink` reaches the server's."""
    if isinstance(trunk, Segment):
        return LocalTrunk(trunk)
    if hasattr(trunk, "generate") and hasattr(trunk, "end_generation"):
        return RemoteTrunk(trunk)
    raise TypeError(f"the trunk must be a Segment or a TrunkLink, not {type(trunk).__name__}")


# ---------------------------------------------------------------------------------------------- decoding
def _processors(options: GenerationOptions, prompt_mask: torch.Tensor, stop_ids: list[int]):
    """transformers' processors and warpers, in the order ``GenerationMixin`` applies them (the repetition
    penalty ignores each row's left padding, as there)."""
    from transformers import (LogitsProcessorList, MinNewTokensLengthLogitsProcessor,
                              RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
                              TopPLogitsWarper)

    processors = LogitsProcessorList()
    if options.repetition_penalty != 1.0:
        padding = (prompt_mask != 0).int().argmax(dim=1)
        processors.append(RepetitionPenaltyLogitsProcessor(options.repetition_penalty, prompt_ignore_length=padding))
    if options.min_new_tokens > 0 and stop_ids:
        processors.append(MinNewTokensLengthLogitsProcessor(prompt_mask.shape[1], options.min_new_tokens, stop_ids))
    if options.do_sample:
        if options.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(options.temperature))
        if options.top_k is not None:
            processors.append(TopKLogitsWarper(options.top_k))
        if options.top_p is not None and options.top_p < 1.0:
            processors.append(TopPLogitsWarper(options.top_p))
    return processors


def _stopping(options: GenerationOptions, prompt_length: int, stop_ids: list[int], tokenizer: Any):
    from transformers import EosTokenCriteria, MaxLengthCriteria, StoppingCriteriaList, StopStringCriteria

    criteria = StoppingCriteriaList([MaxLengthCriteria(prompt_length + options.max_new_tokens)])
    if stop_ids:
        criteria.append(EosTokenCriteria(stop_ids))
    if options.stop_strings:
        if tokenizer is None:
            raise ValueError("stop_strings need the tokenizer")
        criteria.append(StopStringCriteria(tokenizer, options.stop_strings))
    return criteria


def _stop_ids(options: GenerationOptions, tokenizer: Any) -> list[int]:
    if options.eos_token_id is not None:
        return list(options.eos_token_id)
    return [] if tokenizer is None else stop_token_ids(tokenizer)


@torch.no_grad()
def generate(bottom: Segment, trunk: Any, top: Segment, input_ids: torch.Tensor,
             attention_mask: torch.Tensor | None = None, *, options: GenerationOptions | None = None,
             tokenizer: Any = None, streamer: Any = None, defense: Defense | None = None,
             **overrides: Any) -> torch.Tensor:
    """Generate through bare segments: ``trunk`` is a :class:`Segment` (run here) or a
    :class:`~splittrain.cut.TrunkLink` (run on its server). Returns prompt + new ids, (B, T + new), finished rows
    padded, as ``model.generate`` does. ``input_ids`` (B, T) are left-padded when rows differ in length
    (``attention_mask`` 0 on the padding). ``streamer`` (e.g. transformers' ``TextStreamer``) receives the prompt,
    then each new token (batch of one). ``defense`` transforms the bottom's hidden states before they reach the
    trunk (the cut-1 defense of :mod:`splittrain.privacy`)."""
    return decode(Crossing(bottom, top, trunk, defense), input_ids, attention_mask,
                  GenerationOptions.of(options, **overrides), tokenizer, streamer)


@torch.no_grad()
def decode(crossing: Crossing, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
           options: GenerationOptions, tokenizer: Any = None, streamer: Any = None) -> torch.Tensor:
    """:func:`generate` through ``crossing``: each party keeps a KV cache for its own segments, and every position
    leaves the bottom through :meth:`~splittrain.crossing.Crossing.leave`."""
    from transformers import DynamicCache

    device = crossing.bottom.device
    input_ids, mask = _prompt(input_ids, attention_mask, device)
    stop_ids = _stop_ids(options, tokenizer)
    pad = _pad_id(options, tokenizer, stop_ids)
    batch, prompt_length = input_ids.shape
    processors = _processors(options, mask, stop_ids)
    stopping = _stopping(options, prompt_length, stop_ids, tokenizer)
    generator = None
    if options.do_sample and options.seed is not None:
        generator = torch.Generator(device=device).manual_seed(options.seed)
    bottom_cache, top_cache = DynamicCache(config=crossing.bottom.config), DynamicCache(config=crossing.top.config)
    runner = trunk_runner(crossing.link)
    sequences = input_ids
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    step_ids, new_mask = input_ids, mask
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    try:
        while True:
            state = crossing.leave(step_ids, mask, positions, cache=bottom_cache)
            hidden = runner(state.hidden_states, new_mask, positions)
            logits = crossing.top(hidden, attention_mask=mask, position_ids=positions, cache=top_cache,
                                  logits_to_keep=1).logits[:, -1, :].float()
            scores = processors(sequences, logits)
            token = _choose(scores, options.do_sample, generator)
            token = torch.where(unfinished, token, torch.full_like(token, pad))
            sequences = torch.cat([sequences, token[:, None]], dim=1)
            if streamer is not None:
                streamer.put(token.cpu())
            unfinished &= ~stopping(sequences, scores)
            if not bool(unfinished.any()):
                break
            step_ids, new_mask = token[:, None], torch.ones(batch, 1, dtype=torch.long, device=device)
            mask = torch.cat([mask, new_mask], dim=1)
            positions = positions[:, -1:] + 1
    finally:
        runner.close()
        if streamer is not None:
            streamer.end()
    return sequences


def _prompt(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt's ids and attention mask on ``device``, checked: (batch, length >= 1), padded on the left."""
    input_ids = input_ids.to(device)
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, length >= 1), got {list(input_ids.shape)}")
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device=device, dtype=torch.long)
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {list(mask.shape)} does not match input_ids {list(input_ids.shape)}")
    if bool((mask[:, -1] == 0).any()):
        raise ValueError("pad prompts on the left for generation (attention_mask is 0 at a row's last position)")
    return input_ids, mask


def _pad_id(options: GenerationOptions, tokenizer: Any, stop_ids: list[int]) -> int:
    """What fills finished rows: the option, else the tokenizer's pad token, else the first stop token, else 0."""
    pad = options.pad_token_id if options.pad_token_id is not None else getattr(tokenizer, "pad_token_id", None)
    return pad if pad is not None else (stop_ids[0] if stop_ids else 0)


def _choose(scores: torch.Tensor, sample: bool, generator: torch.Generator | None) -> torch.Tensor:
    """The next token of each row: drawn from the processed distribution when ``sample``, else the best."""
    if sample:
        probs = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
    return scores.argmax(dim=-1)


# ---------------------------------------------------------------------------------------------- prompts
def chat_prompts(tokenizer: Any, prompts: Iterable[str | Sequence[dict[str, str]]],
                 chat_template: str | None = None) -> list[list[int]]:
    """Token ids of each prompt through the chat template (the tokenizer's, else ``chat_template``), ending with the
    generation prompt: a string is one user turn, a list of ``{"role", "content"}`` messages is a conversation (its
    last turn is the user's)."""
    from .data import resolve_chat_template

    template = resolve_chat_template(tokenizer, chat_template)
    out = []
    for prompt in prompts:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if not messages or messages[-1].get("role") != "user":
            raise ValueError("a conversation to answer must end with a user turn")
        # rendered, then tokenized without added special tokens, exactly as training tokenizes conversations
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=True)
        out.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return out


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id rows into ``(input_ids, attention_mask)``."""
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("every prompt needs at least one token")
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, length - len(row):] = torch.tensor(list(row), dtype=torch.long)
        mask[i, length - len(row):] = 1
    return ids, mask


def answers(crossing: Crossing, tokenizer: Any, prompts: Sequence[str | Sequence[dict[str, str]]], *,
            batch_size: int = 16, options: GenerationOptions | None = None, streamer: Any = None,
            progress: bool = False, chat_template: str | None = None, **overrides: Any) -> list[str]:
    """Answer each prompt (a user message or a conversation) through the chat template and ``crossing``; decoded
    new text, special tokens skipped. Prompts run in batches of ``batch_size``, left-padded."""
    options = GenerationOptions.of(options, **overrides)
    pad = pad_token_id(tokenizer)
    rows = chat_prompts(tokenizer, prompts, chat_template)
    out: list[str] = []
    starts = range(0, len(rows), batch_size)
    if progress and len(rows) > batch_size:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="generating", unit="batch")
    for start in starts:
        ids, mask = left_pad(rows[start:start + batch_size], pad)
        sequences = decode(crossing, ids, mask, options, tokenizer, streamer)
        out += [tokenizer.decode(s[ids.shape[1]:], skip_special_tokens=True).strip() for s in sequences.tolist()]
    return out


def answer(crossing: Crossing, tokenizer: Any, messages_or_prompts: str | Sequence[Any],
           **kwargs: Any) -> str | list[str]:
    """:func:`answers` of one user message (``str``) or conversation (a list of ``{"role", "content"}``): its answer;
    of a list of them: their answers."""
    single = isinstance(messages_or_prompts, str) or (
        len(messages_or_prompts) > 0 and isinstance(messages_or_prompts[0], Mapping))
    out = answers(crossing, tokenizer, [messages_or_prompts] if single else list(messages_or_prompts), **kwargs)
    return out[0] if single else out


def evaluate_answers(answer: Callable[[list[Any]], list[str]], rows: Sequence[Mapping[str, Any]],
                     extra: Mapping[str, float] | None = None, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Answer each row's ``messages`` with ``answer`` and score against its ``reference``: exact match, ROUGE-L,
    BLEU (plus ``extra`` figures); writes ``eval.json``/``eval.md`` in ``run_dir`` when given. Returns the
    ``metrics`` and the ``generated`` answers."""
    from .metrics import normalize, text_metrics, write_eval

    if not rows:
        raise ValueError("no test rows with an assistant turn to answer")
    generated = answer([row["messages"] for row in rows])
    references = [row["reference"] for row in rows]
    metrics: dict[str, Any] = {**text_metrics(generated, references), **(extra or {}), "rows": len(rows)}
    if run_dir is not None:
        table = [{"prompt": row["messages"][-1]["content"], "reference": ref, "generated": out,
                  "exact": normalize(out) == normalize(ref), "messages": list(row["messages"])}
                 for row, ref, out in zip(rows, references, generated)]
        write_eval(run_dir, metrics, table)
    return {"metrics": metrics, "generated": generated}
