"""Federated shards of the rows: `partition` (iid, Dirichlet label skew, one client per column value) and the data
module's per-client loaders."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from datasets import Dataset, load_dataset
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from torch.utils.data import DataLoader

from splittrain import quickstart
from splittrain.data import InstructionDataModule, to_messages, tokenize_conversation
from splittrain.federated.partition import partition
from splittrain.quickstart import make_data

TASK_NAMES = [task.name for task in make_data.TASKS]


def labelled(counts: dict[str, int]) -> Dataset:
    """Rows with a ``label`` column, the labels interleaved."""
    labels = [label for label, count in counts.items() for _ in range(count)]
    return Dataset.from_dict({"label": labels[::2] + labels[1::2]})


def file_tasks(path) -> list[str]:
    return [json.loads(line)["task"] for line in path.read_text().splitlines()]


def assert_partition(shards: list[list[int]], size: int, clients: int) -> None:
    assert len(shards) == clients and all(shard == sorted(shard) for shard in shards)
    assert sorted(i for shard in shards for i in shard) == list(range(size))  # disjoint and covering


# --- partition --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["iid", "dirichlet", "column"])
def test_partition_is_disjoint_covering_sorted_and_seeded(method):
    rows = labelled({f"v{k}": 30 + 7 * k for k in range(7)})
    shards = partition(rows, 3, method, column="label", seed=1)
    assert_partition(shards, len(rows), 3)
    assert all(shards)
    assert partition(rows, 3, method, column="label", seed=1) == shards
    if method != "column":  # column is fixed by the values
        assert partition(rows, 3, method, column="label", seed=2) != shards


def test_iid_cuts_near_equal_parts():
    shards = partition(Dataset.from_dict({"x": list(range(10))}), 4)
    assert_partition(shards, 10, 4)
    assert sorted(map(len, shards)) == [2, 2, 3, 3]
    assert partition(Dataset.from_dict({"x": [0, 1]}), 1) == [[0, 1]]


def test_dirichlet_skew_grows_as_alpha_shrinks():
    rows = labelled({f"v{k:02d}": 200 for k in range(20)})
    labels = list(rows["label"])

    def mean_max_share(alpha: float) -> float:
        shards = partition(rows, 5, "dirichlet", alpha=alpha, column="label", seed=0)
        assert_partition(shards, len(rows), 5)
        per_value = [Counter(labels[i] for i in shard) for shard in shards]
        return sum(max(c[v] for c in per_value) / 200 for v in set(labels)) / 20

    skewed, even = mean_max_share(0.05), mean_max_share(100.0)
    assert skewed > 0.8 and even < 0.35, (skewed, even)


def test_dirichlet_leaves_no_client_empty():
    rows = Dataset.from_dict({"label": ["a"] * 6})
    for seed in range(5):
        shards = partition(rows, 6, "dirichlet", alpha=0.01, column="label", seed=seed)
        assert_partition(shards, 6, 6)
        assert all(len(shard) == 1 for shard in shards)


def test_column_gives_each_value_to_one_client_in_sorted_order():
    rows = labelled({"c": 3, "a": 5, "d": 2, "b": 4})
    labels = list(rows["label"])
    shards = partition(rows, 3, "column", column="label")
    assert_partition(shards, len(rows), 3)
    assert [sorted({labels[i] for i in shard}) for shard in shards] == [["a", "d"], ["b"], ["c"]]


def test_partition_rejects_bad_options_with_the_config_key():
    rows = labelled({"a": 3, "b": 3})
    with pytest.raises(ValueError, match="model.federated.clients"):
        partition(rows, 0)
    with pytest.raises(ValueError, match="data.partition_alpha"):
        partition(rows, 2, "dirichlet", alpha=0.0, column="label")
    with pytest.raises(ValueError, match="data.partition 'bogus'"):
        partition(rows, 2, "bogus")
    for method in ("dirichlet", "column"):
        with pytest.raises(ValueError, match="data.partition_column"):
            partition(rows, 2, method)
        with pytest.raises(ValueError, match="data.partition_column 'task' is not a column"):
            partition(rows, 2, method, column="task")
    for method in ("iid", "dirichlet"):
        with pytest.raises(ValueError, match="6 rows cannot be split among 7 clients"):
            partition(rows, 7, method, column="label")
    with pytest.raises(ValueError, match="2 distinct values, fewer than the 3 clients"):
        partition(rows, 3, "column", column="label")


# --- the quickstart task column ---------------------------------------------------------------------------------

def test_quickstart_rows_name_their_task_and_still_load_and_tokenize():
    rows = load_dataset("json", data_files=str(quickstart.TRAIN_FILE), split="train")
    assert rows.column_names == ["messages", "task"] and set(rows["task"]) == set(TASK_NAMES)
    assert set(file_tasks(quickstart.VAL_FILE)) == set(TASK_NAMES)
    tokenizer = InstructionDataModule(train="quickstart", tokenizer="quickstart").tokenizer
    assert tokenize_conversation(tokenizer, to_messages(rows[0]))["input_ids"]


# --- the data module --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def by_task() -> InstructionDataModule:
    module = InstructionDataModule(train="quickstart", tokenizer="quickstart", batch_size=4, partition="column",
                                   partition_column="task")
    module.setup("fit")
    return module


def test_column_shards_train_each_client_on_its_own_tasks(by_task):
    tasks = file_tasks(quickstart.TRAIN_FILE)
    # Token sequences of each task: a batch row (without padding) tells its task.
    examples = by_task.train_dataset
    task_of = {tuple(ids): tasks[row] for row, ids in zip(examples["row"], examples["input_ids"])}
    by_task.shard(3)
    assert (by_task.clients, by_task.held) == (3, [0, 1, 2])
    loaders = by_task.train_dataloader()
    assert sorted(loaders) == [0, 1, 2] and all(isinstance(loader, DataLoader) for loader in loaders.values())
    assert sum(len(loader.dataset) for loader in loaders.values()) == len(by_task.train_dataset)
    for client, loader in loaders.items():
        assert loader.batch_sampler.seed == client and loader.batch_sampler.shuffle
        expected = {name for k, name in enumerate(sorted(TASK_NAMES)) if k % 3 == client}
        seen = {task_of[tuple(ids[mask.bool()].tolist())] for batch in loader
                for ids, mask in zip(batch["input_ids"], batch["attention_mask"])}
        assert seen == expected

    combined = CombinedLoader(loaders, "max_size_cycle")
    steps = list(combined)
    assert len(steps) == len(combined) == max(len(loader) for loader in loaders.values())
    for batch, _, _ in steps:
        assert sorted(batch) == [0, 1, 2] and all(0 < b["input_ids"].shape[0] <= 4 for b in batch.values())

    by_task.shard(3, held=[1])
    only = by_task.train_dataloader()
    assert list(only) == [1] and len(only[1].dataset) == len(loaders[1].dataset)


def test_client_validation_shards_are_disjoint_and_cover_val(by_task):
    by_task.shard(3)
    tasks = file_tasks(quickstart.VAL_FILE)
    shards = [by_task.client_dataset(client, "val")["row"] for client in range(3)]
    assert sorted(row for shard in shards for row in shard) == list(by_task.val_dataset["row"])
    for client, shard in enumerate(shards):
        assert {tasks[row] for row in shard} == {n for k, n in enumerate(sorted(TASK_NAMES)) if k % 3 == client}
    loader = by_task.client_loader(2, "val", shuffle=False)
    assert len(loader.dataset) == len(shards[2]) and not loader.batch_sampler.shuffle
    assert len(by_task.val_dataloader().dataset) == len(by_task.val_dataset)  # validation stays global
    with pytest.raises(ValueError, match="client 3 is not one of the 3 clients"):
        by_task.client_dataset(3, "train")
    with pytest.raises(ValueError, match=r"held clients \[3\] must be a non-empty selection of 0..2"):
        by_task.shard(3, held=[3])


def test_one_shard_is_the_unsharded_loader(by_task):
    by_task.shard(1)
    assert (by_task.clients, by_task.held) == (1, [0])
    loader = by_task.train_dataloader()
    assert isinstance(loader, DataLoader) and loader.dataset is by_task.train_dataset
    assert loader.batch_sampler.seed == 0 and by_task.client_dataset(0, "val") is by_task.val_dataset


def test_shards_follow_the_rows_that_tokenization_keeps():
    """Truncation drops examples (the row column keeps the shards right), and a held-out split is sharded too."""
    module = InstructionDataModule(train=str(quickstart.TRAIN_FILE), tokenizer="quickstart", val_size=0.2,
                                   max_length=24, limit=300, partition="dirichlet", partition_alpha=0.3,
                                   partition_column="task", seed=3)
    module.shard(4, held=[0, 2])  # before setup: applied when the rows are loaded
    module.setup("fit")
    loaded = load_dataset("json", data_files=str(quickstart.TRAIN_FILE), split="train").select(range(300))
    raw = dict(zip(("train", "val"), loaded.train_test_split(test_size=0.2, seed=3).values()))
    assert (len(raw["train"]), len(raw["val"])) == (240, 60)
    assert len(module.train_dataset) < 240  # some examples lost every trained token
    assert sorted(module.train_dataloader()) == [0, 2]
    for split, examples in (("train", module.train_dataset), ("val", module.val_dataset)):
        expected = partition(raw[split], 4, "dirichlet", alpha=0.3, column="task", seed=3)
        kept = set(examples["row"])
        for client in range(4):
            shard = module.client_dataset(client, split)
            assert list(shard["row"]) == [row for row in expected[client] if row in kept]
            for example in shard:
                again = tokenize_conversation(module.tokenizer, to_messages(raw[split][example["row"]]), max_length=24)
                assert example["input_ids"] == again["input_ids"]


def test_data_module_rejects_bad_partition_options():
    with pytest.raises(ValueError, match="data.partition 'bogus'"):
        InstructionDataModule(train="quickstart", tokenizer="quickstart", partition="bogus")
    with pytest.raises(ValueError, match="data.partition_column"):
        InstructionDataModule(train="quickstart", tokenizer="quickstart", partition="column")
    with pytest.raises(ValueError, match="data.partition_alpha"):
        InstructionDataModule(train="quickstart", tokenizer="quickstart", partition_alpha=-1.0)
    module = InstructionDataModule(train="quickstart", tokenizer="quickstart", limit=50, partition="column",
                                   partition_column="task")
    with pytest.raises(ValueError, match="model.federated.clients"):
        module.shard(0)
    module.setup("fit")
    with pytest.raises(ValueError, match="sharding the train rows: .* 6 distinct values, fewer than the 7 clients"):
        module.shard(7)
