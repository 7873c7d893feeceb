"""Dividing data among peers: iid and Dirichlet label partitions, TaskConfig's splits, text-lm's by-file split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from collectives.errors import ConfigError
from peer.options import read_options
from peer.tasks import TaskConfig, make_task
from peer.tasks.partition import dirichlet_partition, iid_partition
from peer.tasks.text import TextLMTask

pytestmark = pytest.mark.timeout(60)

FORTUNES = Path("/usr/share/games/fortunes")
# 10 classes of unequal sizes, like a real labelled set (1,440 examples)
LABELS = np.repeat(np.arange(10), [180, 170, 160, 150, 140, 140, 130, 130, 120, 120])


def label_skew(parts: list[np.ndarray], labels: np.ndarray) -> float:
    """Mean over peers of the total-variation distance between a peer's label mix and the global one."""
    overall = np.bincount(labels, minlength=10) / len(labels)
    return float(np.mean([0.5 * np.abs(np.bincount(labels[p], minlength=10) / len(p) - overall).sum() for p in parts]))


def assert_disjoint_cover(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == n
    assert np.array_equal(np.sort(joined), np.arange(n))


# --- iid ---


def test_iid_partition_is_disjoint_covering_and_balanced() -> None:
    parts = iid_partition(1000, 7, seed=3)
    assert_disjoint_cover(parts, 1000)
    assert sorted(len(p) for p in parts) == [142] * 1 + [143] * 6
    assert all(p.dtype == np.int64 and np.array_equal(p, np.sort(p)) for p in parts)


def test_iid_partition_is_deterministic_per_seed() -> None:
    a, b, c = iid_partition(100, 4, 0), iid_partition(100, 4, 0), iid_partition(100, 4, 1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])


def test_iid_partition_refuses_more_peers_than_examples() -> None:
    with pytest.raises(ConfigError, match="cannot give each of 5 peers at least 1 example"):
        iid_partition(4, 5, 0)


# --- Dirichlet ---


@pytest.mark.parametrize("alpha", [100.0, 1.0, 0.1, 0.01])
def test_dirichlet_partition_is_disjoint_covering_and_every_peer_holds_data(alpha: float) -> None:
    parts = dirichlet_partition(LABELS, 8, alpha, seed=0)
    assert len(parts) == 8
    assert_disjoint_cover(parts, len(LABELS))
    assert min(len(p) for p in parts) >= 1


def test_dirichlet_partition_is_deterministic_per_seed() -> None:
    a = dirichlet_partition(LABELS, 5, 0.5, seed=2)
    b = dirichlet_partition(LABELS, 5, 0.5, seed=2)
    c = dirichlet_partition(LABELS, 5, 0.5, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert any(not np.array_equal(x, y) for x, y in zip(a, c))


def test_small_alpha_skews_labels_far_more_than_large_alpha() -> None:
    near_iid = label_skew(dirichlet_partition(LABELS, 8, 100.0, seed=0), LABELS)
    skewed = label_skew(dirichlet_partition(LABELS, 8, 0.1, seed=0), LABELS)
    assert near_iid < 0.1
    assert skewed > 0.5


def test_at_alpha_0_1_every_peer_holds_mostly_three_classes_or_fewer() -> None:
    parts = dirichlet_partition(LABELS, 8, 0.1, seed=0)
    top3 = [np.sort(np.bincount(LABELS[p], minlength=10))[-3:].sum() / len(p) for p in parts]
    assert min(top3) >= 0.8


def test_an_empty_peer_takes_examples_from_the_largest_until_it_holds_min_size() -> None:
    # alpha 0.001 gives whole classes to one peer; 4 classes of 5 for 8 peers leaves some with nothing
    labels = np.repeat(np.arange(4), 5)
    parts = dirichlet_partition(labels, 8, 0.001, seed=0, min_size=2)
    assert_disjoint_cover(parts, 20)
    assert min(len(p) for p in parts) == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((LABELS, 4, 0.0, 0), "alpha must be a finite number > 0"),
        ((LABELS, 4, float("inf"), 0), "alpha must be a finite number > 0"),
        ((LABELS, 0, 1.0, 0), "world >= 1"),
        ((np.arange(3), 4, 1.0, 0), "cannot give each of 4 peers at least 1 example"),
        ((LABELS.reshape(2, -1), 2, 1.0, 0), "1-D"),
    ],
)
def test_dirichlet_partition_refuses_bad_arguments(args: tuple, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        dirichlet_partition(*args)


# --- TaskConfig ---


def test_task_config_dirichlet_must_be_positive_and_leaves_split_at_iid() -> None:
    with pytest.raises(ConfigError, match=r"dirichlet \(alpha\) must be a number > 0"):
        TaskConfig(dirichlet=0.0)
    with pytest.raises(ConfigError, match="leave split at 'iid'"):
        TaskConfig(dirichlet=0.5, split="non-iid")
    assert TaskConfig(dirichlet=0.5).partitioning == "dirichlet"
    assert TaskConfig(split="by-file").partitioning == "by-file"


def test_dirichlet_is_a_command_line_option() -> None:
    import argparse

    from peer.options import add_options

    parser = argparse.ArgumentParser()
    add_options(parser, TaskConfig)
    assert read_options(TaskConfig, parser.parse_args(["--dirichlet", "0.1"])).dirichlet == 0.1
    assert read_options(TaskConfig, parser.parse_args([])).dirichlet is None


@pytest.mark.parametrize(
    ("task", "config", "refused"),
    [
        ("synthetic-lm", TaskConfig(dirichlet=0.5), "dirichlet"),
        ("synthetic-lm", TaskConfig(split="by-file"), "by-file"),
        ("digits", TaskConfig(split="non-iid"), "non-iid"),
        ("digits", TaskConfig(split="by-file"), "by-file"),
    ],
)
def test_a_task_refuses_a_split_it_does_not_implement(task: str, config: TaskConfig, refused: str) -> None:
    with pytest.raises(ConfigError, match=f"does not implement the split '{refused}'.*--dirichlet ALPHA"):
        make_task(task, config)


# --- text-lm by file ---


def corpus_of_files(folder: Path, n: int) -> Path:
    """n files, file i repeating its own letter (so a window's letter names its file), 1,000 characters each."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"{i:02d}.txt").write_text(chr(ord("a") + i) * 1000, encoding="utf-8")
    return folder


def letters_seen(task: TextLMTask, rank: int, world: int, batches: int = 20) -> set[str]:
    return {c for i in range(batches) for row in task.batch(rank, world, i)[0] for c in task.decode(row)}


def test_by_file_gives_peer_r_the_files_i_with_i_mod_world_equal_r(tmp_path: Path) -> None:
    # 7 files of 1,000 characters joined by newlines: the held-out last 10% is the tail of file 6 ("g"),
    # which keeps 299 characters of training text
    task = TextLMTask(TaskConfig(data=str(corpus_of_files(tmp_path / "c", 7)), seq_len=16, split="by-file"))
    assert letters_seen(task, 0, 3) == {"a", "d", "g"}
    assert letters_seen(task, 1, 3) == {"b", "e"}
    assert letters_seen(task, 2, 3) == {"c", "f"}


def test_by_file_windows_never_cross_a_file_boundary(tmp_path: Path) -> None:
    task = TextLMTask(TaskConfig(data=str(corpus_of_files(tmp_path / "c", 4)), seq_len=16, split="by-file"))
    for i in range(50):
        inputs, targets = task.batch(0, 2, i)
        assert all(len(set(task.decode(row))) == 1 for row in inputs)
        assert all(len(set(task.decode(row))) == 1 for row in targets)


def test_by_file_keeps_the_same_eval_set(tmp_path: Path) -> None:
    data = str(corpus_of_files(tmp_path / "c", 4))
    by_file = TextLMTask(TaskConfig(data=data, seq_len=16, split="by-file"))
    iid = TextLMTask(TaskConfig(data=data, seq_len=16))
    assert all(np.array_equal(x[0], y[0]) for x, y in zip(by_file.eval_set(), iid.eval_set()))


def test_by_file_refuses_fewer_files_than_peers(tmp_path: Path) -> None:
    # the held-out 10% is the tail of the last file, which keeps 600 characters of training text: 4 files count
    task = TextLMTask(TaskConfig(data=str(corpus_of_files(tmp_path / "c", 4)), seq_len=16, split="by-file"))
    assert len(task.file_spans) == 4
    with pytest.raises(ConfigError, match=r"has 4 file\(s\) with a window of training text .* for 5 peers"):
        task.batches(0, 5)


def test_by_file_does_not_deal_out_a_file_that_is_all_held_out(tmp_path: Path) -> None:
    folder = corpus_of_files(tmp_path / "c", 3)
    (folder / "99.txt").write_text("z" * 200, encoding="utf-8")  # last in path order: inside the held-out 10%
    task = TextLMTask(TaskConfig(data=str(folder), seq_len=16, split="by-file"))
    assert [task.decode(task.train_tokens[lo:hi])[0] for lo, hi in task.file_spans] == ["a", "b", "c"]


@pytest.mark.skipif(not FORTUNES.is_dir(), reason=f"{FORTUNES} absent (apt-get install fortunes)")
def test_by_file_on_fortunes_gives_peers_different_collections() -> None:
    task = make_task("text-lm", TaskConfig(data=str(FORTUNES), split="by-file"))
    assert isinstance(task, TextLMTask)
    spans = [set(task.spans(r, 4)) for r in range(4)]
    assert all(spans[r] and spans[r].isdisjoint(spans[q]) for r in range(4) for q in range(r))
    assert set().union(*spans) == set(task.file_spans)
