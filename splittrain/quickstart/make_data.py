"""Writes the quickstart data set and tokenizer; deterministic, so running it twice gives identical files.

    python splittrain/quickstart/make_data.py              # rewrites splittrain/quickstart/{data,tokenizer}
    python splittrain/quickstart/make_data.py --out DIR    # somewhere else

Tasks a tiny random model learns in two minutes on a CPU: reverse, count or upper-case one of 40 short words, add
two digits or subtract the smaller from the larger, and look up the colour of a made-up fruit (the quickstart answers
about two thirds of its held-out rows exactly: the word and colour tasks mostly right, the sums mostly not). Each
task has a few phrasings; some rows have a system message and some are two-turn ("now do the same for ..."), so the
assistant-only labels of later turns get exercised. The 200 validation rows are spread evenly over the tasks and
none repeats a training row exactly (a new phrasing, system message or follow-up of words and numbers seen in
training).
Every row names its task (``"task"``: reverse, count, upper, add, subtract, colour), e.g. to give federated clients
one task each (``data.partition: column``, ``data.partition_column: task``).
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

HERE = Path(__file__).resolve().parent
SEED = 0
TRAIN_ROWS = 4000
VAL_ROWS = 200
VOCAB_SIZE = 384  # 256 bytes + 3 special tokens + 125 merges: most tokens are characters or short pieces
TWO_TURN_FRACTION = 0.1
SYSTEM_FRACTION = 0.25
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2

WORDS = """
apple bread chair eagle grape house juice lemon night ocean piano river stone table water cloud dream light paper
tiger train world bird cake door fish goat hand lamp milk nest owl rain sun tree wolf hat key map sea
""".split()
FRUIT_COLOURS = {
    "blorp": "purple", "zindle": "green", "quibberry": "blue", "marnot": "red", "flumple": "yellow",
    "tazzle": "orange", "grolo": "brown", "vintap": "pink", "skeeb": "white", "purnel": "black",
    "drizzick": "silver", "yammon": "gold",
}
SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "Answer briefly.",
    "You are a careful assistant. Reply with the answer only.",
]


class Task(NamedTuple):
    """A question family: its name, how to draw its arguments, its phrasings, its answer and a follow-up phrasing."""

    name: str
    draw: Callable[[random.Random], dict]
    phrasings: list[str]
    answer: Callable[..., str]
    follow_up: str


def _word(rng: random.Random) -> dict:
    return {"word": rng.choice(WORDS)}


def _numbers(rng: random.Random) -> dict:
    return {"a": rng.randrange(10), "b": rng.randrange(10)}


def _ordered_numbers(rng: random.Random) -> dict:
    a, b = rng.randrange(10), rng.randrange(10)
    return {"a": max(a, b), "b": min(a, b)}


TASKS = [
    Task("reverse", _word,
         ['Reverse the word "{word}".', "Write {word} backwards.", 'What is "{word}" spelled backwards?',
          "Spell the word {word} in reverse order."],
         lambda word: word[::-1], 'Now do the same for "{word}".'),
    Task("count", _word,
         ['How many letters are in the word "{word}"?', "Count the letters in {word}.",
          'What is the length of the word "{word}"?'],
         lambda word: str(len(word)), 'Now do the same for "{word}".'),
    Task("upper", _word,
         ['Write "{word}" in capital letters.', "Convert {word} to upper case.", 'Uppercase the word "{word}".'],
         lambda word: word.upper(), 'Now do the same for "{word}".'),
    Task("add", _numbers, ["What is {a} + {b}?", "Add {a} and {b}.", "Compute the sum of {a} and {b}."],
         lambda a, b: str(a + b), "Now do the same for {a} and {b}."),
    Task("subtract", _ordered_numbers,
         ["What is {a} - {b}?", "Subtract {b} from {a}.", "What do you get when you take {b} away from {a}?"],
         lambda a, b: str(a - b), "Now do the same for {a} and {b}."),
    Task("colour", lambda rng: {"fruit": rng.choice(sorted(FRUIT_COLOURS))},
         ["What colour is a {fruit}?", "Tell me the colour of the {fruit} fruit.", "Which colour does a {fruit} have?"],
         lambda fruit: f"A {fruit} is {FRUIT_COLOURS[fruit]}.", "And a {fruit}?"),
]


def conversation(rng: random.Random) -> dict:
    """One row in ``messages`` format: optional system message, a question and its answer, maybe a follow-up; and
    the name of its task."""
    messages = []
    if rng.random() < SYSTEM_FRACTION:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    task = rng.choice(TASKS)
    args = task.draw(rng)
    messages += [{"role": "user", "content": rng.choice(task.phrasings).format(**args)},
                 {"role": "assistant", "content": task.answer(**args)}]
    if rng.random() < TWO_TURN_FRACTION:
        args = task.draw(rng)
        messages += [{"role": "user", "content": task.follow_up.format(**args)},
                     {"role": "assistant", "content": task.answer(**args)}]
    return {"messages": messages, "task": task.name}


def generate(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """``(train, val)`` rows; validation rows never repeat a training row exactly."""
    rng = random.Random(seed)
    train = [conversation(rng) for _ in range(TRAIN_ROWS)]
    seen = {json.dumps(row) for row in train}
    val: list[dict] = []
    per_task = {task.name: 0 for task in TASKS}
    while len(val) < VAL_ROWS:
        row = conversation(rng)
        if (key := json.dumps(row)) not in seen and per_task[row["task"]] < -(-VAL_ROWS // len(TASKS)):
            seen.add(key)
            per_task[row["task"]] += 1
            val.append(row)
    return train, val


def write_jsonl(rows: Iterable[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as file:
        for row in rows:
            file.write(json.dumps(row, ensure_ascii=False) + "\n")


def train_tokenizer(rows: Iterable[dict], vocab_size: int = VOCAB_SIZE, special_tokens: list[str] | None = None,
                    eos: str = "<|im_end|>", pad: str = "<|endoftext|>", bos: str | None = None,
                    chat_template: str | None = "chatml") -> PreTrainedTokenizerFast:
    """A byte-level BPE (digits split one by one) trained on the rows, as a transformers fast tokenizer. By default
    the quickstart's: ChatML template, eos ``<|im_end|>``, pad ``<|endoftext|>``, no bos; ``chat_template=None``
    leaves it without a template (a recipe's fallback then renders)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from splittrain.chat_templates import CHAT_TEMPLATES

    specials = special_tokens or SPECIAL_TOKENS

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)  # offsets cover whole tokens, for label masking
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = (f"{m['role']}\n{m['content']}\n" for row in rows for m in row["messages"])
    bpe.train_from_iterator(texts, trainer)
    named = {"eos_token": eos, "pad_token": pad, **({"bos_token": bos} if bos else {})}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, **named, model_max_length=512,
                                        extra_special_tokens=[t for t in specials if t not in named.values()])
    tokenizer.chat_template = CHAT_TEMPLATES.get(chat_template, chat_template) if chat_template else None
    return tokenizer


def main(out: Path = HERE) -> None:
    """Write ``out/data/{train,val}.jsonl`` and ``out/tokenizer/``."""
    train, val = generate()
    write_jsonl(train, out / "data" / "train.jsonl")
    write_jsonl(val, out / "data" / "val.jsonl")
    train_tokenizer(train).save_pretrained(out / "tokenizer")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="folder that receives data/ and tokenizer/")
    main(parser.parse_args().out)
