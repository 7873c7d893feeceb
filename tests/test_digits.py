"""The digits task: scikit-learn's 8x8 handwritten digits, a small MLP, per-peer partitions and held-out accuracy."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from collectives.errors import ConfigError
from peer.tasks import TaskConfig, batch_stream, make_task, task_names
from peer.tasks import digits as digits_module
from peer.tasks.digits import DigitsTask, load_digits

pytestmark = pytest.mark.timeout(60)


def task(**options) -> DigitsTask:
    made = make_task("digits", TaskConfig(**options))
    assert isinstance(made, DigitsTask)
    return made


def test_digits_is_a_registered_task() -> None:
    assert "digits" in task_names()


def test_images_are_float32_in_0_1_and_labels_are_ten_classes() -> None:
    images, labels = load_digits()
    assert images.shape == (1797, 64) and images.dtype == np.float32
    assert float(images.min()) == 0.0 and float(images.max()) == 1.0
    assert labels.dtype == np.int64 and set(labels.tolist()) == set(range(10))


def test_held_out_set_is_a_fifth_of_every_class_disjoint_from_training() -> None:
    t = task()
    assert len(t.eval_labels) == 359 and len(t.train_labels) == 1438
    _, labels = load_digits()
    per_class = np.bincount(t.eval_labels, minlength=10)
    assert per_class.tolist() == [round(0.2 * n) for n in np.bincount(labels)]
    train_rows = {row.tobytes() for row in t.train_images}
    # the data has a few duplicate images; almost every held-out image is unseen in training
    assert sum(row.tobytes() in train_rows for row in t.eval_images) <= 5


def test_held_out_set_is_the_same_for_every_seed_and_split() -> None:
    a = task(seed=0).eval_set()
    b = task(seed=7, dirichlet=0.1).eval_set()
    assert len(a) == len(b) == 1
    assert torch.equal(a[0][0], b[0][0]) and torch.equal(a[0][1], b[0][1])


def test_build_model_is_deterministic_per_seed_and_leaves_the_global_rng_untouched() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = task(seed=3).build_model().state_dict()
    assert torch.equal(torch.rand(3), expected)
    b = task(seed=3).build_model().state_dict()
    c = task(seed=4).build_model().state_dict()
    assert list(a) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert a["fc1.weight"].shape == (64, 64) and a["fc2.weight"].shape == (10, 64)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["fc1.weight"], c["fc1.weight"])


def test_d_model_sets_the_hidden_width() -> None:
    model = task(d_model=32, n_heads=4).build_model()
    assert model.fc1.weight.shape == (32, 64)


def test_iid_partitions_cover_the_training_set_with_sizes_within_one() -> None:
    t = task()
    parts = [t.partition(r, 3) for r in range(3)]
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(1438))
    assert [t.partition_size(r, 3) for r in range(3)] == [480, 479, 479]


def test_dirichlet_partitions_follow_the_config_and_cover_the_training_set() -> None:
    t = task(dirichlet=0.1)
    parts = [t.partition(r, 8) for r in range(8)]
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(1438))
    # at alpha 0.1 a peer's three most common labels are most of its data
    top3 = [np.sort(np.bincount(t.train_labels[p], minlength=10))[-3:].sum() / len(p) for p in parts]
    assert min(top3) >= 0.75


def test_batches_are_deterministic_per_seed_rank_and_world() -> None:
    def first(seed: int, rank: int, world: int) -> torch.Tensor:
        return next(task(seed=seed, batch_size=8).batches(rank, world))[1]

    assert torch.equal(first(0, 1, 3), first(0, 1, 3))
    assert not torch.equal(first(0, 1, 3), first(0, 0, 3))
    assert not torch.equal(first(0, 1, 3), first(1, 1, 3))


def test_a_batch_is_images_and_labels_of_batch_size() -> None:
    images, labels = next(task(batch_size=5).batches(0, 1))
    assert images.shape == (5, 64) and images.dtype == torch.float32
    assert labels.shape == (5,) and labels.dtype == torch.int64


def test_each_epoch_shows_every_image_of_the_partition_exactly_once_in_a_new_order() -> None:
    t = task(batch_size=32)
    mine = t.partition(1, 3)  # 479 images: 14 full batches and one of 31
    per_epoch = t.batches_per_epoch(1, 3)
    assert per_epoch == 15
    stream = t.batches(1, 3)
    epochs = [[next(stream)[1] for _ in range(per_epoch)] for _ in range(2)]
    assert [len(b) for b in epochs[0]] == [32] * 14 + [31]
    for epoch in epochs:
        assert np.array_equal(np.sort(torch.cat(epoch).numpy()), np.sort(t.train_labels[mine]))
    assert not torch.equal(torch.cat(epochs[0]), torch.cat(epochs[1]))


def test_a_stream_started_at_k_continues_the_stream_from_zero() -> None:
    t = task(batch_size=32)
    stream = t.batches(0, 2)
    drawn = [next(stream) for _ in range(30)]  # crosses the epoch boundary at 23
    resumed = batch_stream(t, 0, 2, start=21)
    for want in drawn[21:]:
        got = next(resumed)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_a_partition_smaller_than_a_batch_is_one_whole_batch_per_epoch() -> None:
    t = task(batch_size=32)
    size = t.partition_size(99, 100)
    assert size == 14
    assert t.batches_per_epoch(99, 100) == 1
    stream = t.batches(99, 100)
    a, b = next(stream), next(stream)
    assert len(a[1]) == len(b[1]) == 14
    assert torch.equal(torch.sort(a[1]).values, torch.sort(b[1]).values)


def test_more_peers_than_training_images_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="cannot give each of 1439 peers at least 1 example"):
        task().batches(0, 1439)


def test_evaluate_is_the_mean_cross_entropy_over_the_held_out_set() -> None:
    t = task()
    model = t.build_model()
    with torch.no_grad():
        expected = F.cross_entropy(model(torch.from_numpy(t.eval_images)), torch.from_numpy(t.eval_labels))
    assert t.evaluate(model) == pytest.approx(float(expected), rel=1e-6)


def test_accuracy_is_the_fraction_of_held_out_images_classified_right_and_restores_train_mode() -> None:
    t = task()
    model = t.build_model()
    model.train()
    predicted = model(torch.from_numpy(t.eval_images)).argmax(dim=1).numpy()
    assert t.accuracy(model) == pytest.approx(float(np.mean(predicted == t.eval_labels)))
    assert model.training


def test_a_language_model_task_has_no_accuracy() -> None:
    lm = make_task("synthetic-lm", TaskConfig())
    assert lm.accuracy(lm.build_model()) is None
    assert lm.partition_size(0, 1) is None


def test_a_short_training_run_on_one_peer_classifies_the_held_out_set() -> None:
    t = task(batch_size=32, seed=0)
    model = t.build_model()
    before = t.accuracy(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    stream = t.batches(0, 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # matrices this small only lose to intra-op threads on a shared machine
    try:
        for _ in range(200):
            loss = t.loss(model, next(stream))
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    assert before < 0.2  # chance is 0.1
    assert t.accuracy(model) > 0.9


def test_without_scikit_learn_building_the_task_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes the import raise ImportError
    digits_module.load_digits.cache_clear()
    try:
        with pytest.raises(ConfigError, match=r"pip install 'loconet\[federated\]'"):
            task()
    finally:
        digits_module.load_digits.cache_clear()


def test_models_built_in_many_threads_at_once_are_identical():
    # torch's global generator is process-wide: the peers of bench federated build their models in threads.
    import threading

    task = make_task("digits", TaskConfig(seed=5))
    built: list[dict] = []

    def build() -> None:
        for _ in range(10):
            built.append({k: v.clone() for k, v in task.build_model().state_dict().items()})

    threads = [threading.Thread(target=build) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(built) == 60
    assert all(all(torch.equal(b[k], built[0][k]) for k in b) for b in built)


def test_a_peer_whose_data_is_smaller_than_a_batch_counts_the_images_it_trained_on():
    from optimizers.federated import FedAvg, FedConfig
    from optimizers.peers import LocalPeer
    from peer.runtime.training import TrainConfig, TrainLoop

    task = make_task("digits", TaskConfig(batch_size=32))
    world = 64  # 1,438 training images over 64 peers: 22 or 23 each, fewer than a batch
    size = task.partition_size(0, world)
    assert size < 32
    model = task.build_model()
    opt = FedAvg(model, torch.optim.SGD(model.parameters(), lr=0.1), LocalPeer(), FedConfig(sync_every=100))
    loop = TrainLoop(task, model, opt, TrainConfig.of("fedavg", steps=3), rank=0, world=world)
    assert loop.run().samples == 3 * size
    assert opt.samples_since_sync == 3 * size  # the weight of its next contribution
