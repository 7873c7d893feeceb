"""Training tasks: determinism, data splits, the synthetic entropy floor, text corpora and user tasks."""

from __future__ import annotations

import math
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from collectives.errors import ConfigError
from peer.tasks import Task, TaskConfig, batch_stream, make_task
from peer.tasks.registry import DEFAULT_TASK, TASK_HELP, register_task, task_names
from peer.tasks.synthetic import SyntheticLMTask, entropy_rate, row_entropies, stationary_distribution
from peer.tasks.text import TextLMTask

pytestmark = pytest.mark.timeout(120)

FORTUNES = Path("/usr/share/games/fortunes")
LM_TASKS = ("synthetic-lm", "text-lm")  # token-sequence tasks; digits has its own tests (tests/test_digits.py)


def small_corpus(folder: Path) -> Path:
    """A few files of plain text, about 6000 characters in all."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.txt").write_text("the quick brown fox jumps over the lazy dog.\n" * 60, encoding="utf-8")
    sub = folder / "sub"
    sub.mkdir(exist_ok=True)
    (sub / "b.txt").write_text("pack my box with five dozen liquor jugs! ÄÖÜ\n" * 70, encoding="utf-8")
    return folder


@pytest.fixture
def text_task(tmp_path: Path) -> TextLMTask:
    return TextLMTask(TaskConfig(data=str(small_corpus(tmp_path / "corpus")), seq_len=32, batch_size=8))


def make(name: str, tmp_path: Path, **options) -> Task:
    """A built-in task; text-lm on a small corpus under tmp_path."""
    if name == "text-lm":
        options.setdefault("data", str(small_corpus(tmp_path / "corpus")))
        options.setdefault("seq_len", 32)
    return make_task(name, TaskConfig(**options))


# --- model and batches (both built-in tasks) ---


@pytest.mark.parametrize("name", LM_TASKS)
def test_build_model_is_deterministic_for_a_seed_and_differs_across_seeds(name: str, tmp_path: Path) -> None:
    a = make(name, tmp_path, seed=3).build_model().state_dict()
    b = make(name, tmp_path, seed=3).build_model().state_dict()
    c = make(name, tmp_path, seed=4).build_model().state_dict()
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["blocks.0.attn.qkv.weight"], c["blocks.0.attn.qkv.weight"])


def test_build_model_leaves_the_global_rng_untouched() -> None:
    task = make_task("synthetic-lm", TaskConfig())
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    task.build_model()
    assert torch.equal(torch.rand(3), expected)


def test_parameters_of_each_block_share_a_prefix() -> None:
    model = make_task("synthetic-lm", TaskConfig(n_layers=3)).build_model()
    names = [n for n, _ in model.named_parameters()]
    for i in range(3):
        assert len([n for n in names if n.startswith(f"blocks.{i}.")]) == 12
    outside = {n for n in names if not n.startswith("blocks.")}
    assert outside == {"tok_emb.weight", "pos_emb.weight", "ln_f.weight", "ln_f.bias", "head.weight"}


@pytest.mark.parametrize("name", task_names())
def test_batches_are_deterministic_per_seed_rank_world(name: str, tmp_path: Path) -> None:
    def first(seed: int, rank: int, world: int, n: int = 3) -> list[torch.Tensor]:
        stream = make(name, tmp_path, seed=seed).batches(rank, world)
        return [next(stream)[0] for _ in range(n)]

    same = first(0, 1, 3)
    assert all(torch.equal(x, y) for x, y in zip(same, first(0, 1, 3)))
    assert not torch.equal(same[0], first(0, 0, 3)[0])  # another rank
    assert not torch.equal(same[0], first(1, 1, 3)[0])  # another seed
    assert not torch.equal(same[0], same[1])  # the stream moves on


@pytest.mark.parametrize("name", LM_TASKS)
def test_batch_shapes_dtypes_and_targets_shifted_by_one(name: str, tmp_path: Path) -> None:
    task = make(name, tmp_path, batch_size=5, seq_len=24)
    inputs, targets = next(task.batches(0, 1))
    assert inputs.shape == targets.shape == (5, 24)
    assert inputs.dtype == targets.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    vocab = task.build_model().config.vocab_size
    assert 0 <= int(inputs.min()) and int(max(inputs.max(), targets.max())) < vocab
    assert task.samples_per_batch() == 5


def test_batches_resume_at_a_batch_index() -> None:
    task = SyntheticLMTask(TaskConfig())
    stream = task.batches(1, 2)
    third = [next(stream) for _ in range(3)][2]
    assert torch.equal(next(task.batches(1, 2, start=2))[0], third[0])


class _Counting:
    """A batch source that records which batches it built."""

    def __init__(self, takes_start: bool) -> None:
        self.built: list[int] = []
        if takes_start:
            self.batches = self._from

    def batches(self, rank, world):
        return self._from(rank, world)

    def _from(self, rank, world, start=0):
        i = start
        while True:
            self.built.append(i)
            yield torch.tensor([i]), torch.tensor([rank])
            i += 1


def test_batch_stream_jumps_to_start_when_batches_takes_start() -> None:
    source = _Counting(takes_start=True)
    assert int(next(batch_stream(source, 0, 1, start=5))[0]) == 5
    assert source.built == [5]


def test_batch_stream_draws_and_discards_up_to_start_otherwise() -> None:
    source = _Counting(takes_start=False)
    assert int(next(batch_stream(source, 0, 1, start=3))[0]) == 3
    assert source.built == [0, 1, 2, 3]


def test_bad_rank_is_a_config_error_at_call_time() -> None:
    with pytest.raises(ConfigError, match="rank"):
        make_task("synthetic-lm", TaskConfig()).batches(2, 2)


def test_evaluate_is_repeatable_and_restores_train_mode() -> None:
    task = make_task("synthetic-lm", TaskConfig(eval_batches=2))
    model = task.build_model()
    model.train()
    model.blocks[0].eval()  # a mixed state must come back as it was
    first = task.evaluate(model)
    assert task.evaluate(model) == first
    assert model.training and not model.blocks[0].training and model.blocks[1].training
    assert all(p.grad is None for p in model.parameters())


def test_task_config_rejects_bad_values() -> None:
    with pytest.raises(ConfigError, match="split"):
        TaskConfig(split="shuffled")
    with pytest.raises(ConfigError, match="multiple of n_heads"):
        TaskConfig(d_model=30, n_heads=4)
    with pytest.raises(ConfigError, match="data is empty"):  # an unset $DATA: it read the working directory
        TaskConfig(data=" ")


def test_unknown_task_name_lists_the_choices() -> None:
    with pytest.raises(ConfigError, match="synthetic-lm, text-lm.*module:function"):
        make_task("imagenet", TaskConfig())


# --- synthetic-lm ---


def test_entropy_rate_of_a_two_state_chain_matches_the_hand_computation() -> None:
    a, b = 0.3, 0.1  # P(0 -> 1), P(1 -> 0)
    chain = np.array([[1 - a, a], [b, 1 - b]])
    pi = np.array([b / (a + b), a / (a + b)])  # solves pi P = pi: (0.25, 0.75)

    def h(p: float) -> float:
        return -(p * math.log(p) + (1 - p) * math.log(1 - p))

    np.testing.assert_allclose(stationary_distribution(chain), pi, rtol=1e-12)
    np.testing.assert_allclose(row_entropies(chain), [h(a), h(b)], rtol=1e-12)
    assert entropy_rate(chain) == pytest.approx(0.25 * h(0.3) + 0.75 * h(0.1), rel=1e-12)


def test_an_oracle_with_the_true_chain_scores_the_entropy_floor() -> None:
    task = SyntheticLMTask(TaskConfig())
    log_p = torch.from_numpy(np.log(task.transition))
    total = count = 0.0
    for inputs, targets in task.eval_set():
        total += float(-log_p[inputs, targets].sum())
        count += targets.numel()
    oracle = total / count
    floor = task.entropy_floor
    print(f"\nsynthetic-lm floor {floor:.4f} nats, oracle on the eval set {oracle:.4f}")
    assert oracle == pytest.approx(floor, rel=0.02)
    assert 1.0 < floor < math.log(task.config.vocab_size) - 1.0  # a chain far from uniform


def test_a_fresh_model_scores_near_log_vocab() -> None:
    task = make_task("synthetic-lm", TaskConfig())
    assert task.evaluate(task.build_model()) == pytest.approx(math.log(64), abs=0.05)


def test_a_short_training_run_approaches_the_floor() -> None:
    task = make_task("synthetic-lm", TaskConfig())
    model = task.build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        before = task.evaluate(model)
        stream, times = task.batches(0, 1), []
        for _ in range(150):
            batch = next(stream)
            start = time.perf_counter()
            loss = task.loss(model, batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - start)
        after = task.evaluate(model)
    finally:
        torch.set_num_threads(threads)
    floor = task.entropy_floor
    print(
        f"\nsynthetic-lm 150 steps: eval {before:.3f} -> {after:.3f}, floor {floor:.3f}, gap {after - floor:.3f}; "
        f"median step {1000 * float(np.median(times)):.1f} ms (1 thread)"
    )
    assert after < before - 1.5
    assert after - floor < 0.35


def test_non_iid_ranks_see_different_token_histograms() -> None:
    def histogram(task: SyntheticLMTask, rank: int) -> np.ndarray:
        tokens = torch.cat([task.batch(rank, 2, i)[0].ravel() for i in range(4)])
        return np.bincount(tokens.numpy(), minlength=64) / tokens.numel()

    def distance(p: np.ndarray, q: np.ndarray) -> float:
        return 0.5 * float(np.abs(p - q).sum())

    non_iid = SyntheticLMTask(TaskConfig(split="non-iid"))
    iid = SyntheticLMTask(TaskConfig(split="iid"))
    assert distance(histogram(non_iid, 0), histogram(non_iid, 1)) > 0.4
    assert distance(histogram(iid, 0), histogram(iid, 1)) < 0.15
    # the shared eval set does not depend on the split: it is drawn from the mixture (the stationary chain)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(non_iid.eval_set(), iid.eval_set()))
    assert non_iid.entropy_floor == iid.entropy_floor


# --- text-lm ---


def test_text_vocab_comes_from_the_data(text_task: TextLMTask) -> None:
    assert text_task.vocab == "".join(
        sorted(set("the quick brown fox jumps over the lazy dog.\npack my box with five dozen liquor jugs! ÄÖÜ\n"))
    )
    assert text_task.build_model().config.vocab_size == text_task.vocab_size
    inputs, _ = next(text_task.batches(0, 1))
    assert len(text_task.decode(inputs[0])) == 32
    assert text_task.entropy_floor is None


def test_text_eval_set_is_fixed_across_seeds_peers_and_calls(tmp_path: Path) -> None:
    corpus = str(small_corpus(tmp_path / "corpus"))
    a = TextLMTask(TaskConfig(data=corpus, seq_len=32, seed=0))
    b = TextLMTask(TaskConfig(data=corpus, seq_len=32, seed=9, split="non-iid"))
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a.eval_set(), b.eval_set()))
    # held out: the last 10%, which is all of the second file's text
    assert "quick" not in "".join(a.decode(x[0]) for x in a.eval_set())


def test_text_non_iid_shards_are_disjoint(tmp_path: Path) -> None:
    folder = tmp_path / "halves"
    folder.mkdir()
    # sizes chosen so that, with the newline between files, the training part is 8003 characters
    # and the first of two shards is exactly file 1 and its newline
    (folder / "1.txt").write_text("abcdefgh" * 500, encoding="utf-8")
    (folder / "2.txt").write_text(("stuvwxyz" * 700)[:4891], encoding="utf-8")
    task = TextLMTask(TaskConfig(data=str(folder), seq_len=16, split="non-iid"))
    assert task.shard_bounds(0, 2) == (0, 4001)
    seen = {
        r: set("".join(task.decode(task.batch(r, 2, i)[0][j]) for i in range(5) for j in range(16))) for r in (0, 1)
    }
    assert seen[0] <= set("abcdefgh\n") and seen[1] <= set("stuvwxyz\n")
    bounds = [task.shard_bounds(r, 3) for r in range(3)]
    assert bounds[0][0] == 0 and bounds[0][1] == bounds[1][0] and bounds[1][1] == bounds[2][0]
    for rank, (lo, hi) in enumerate(bounds):
        starts = np.concatenate([task.window_starts(rank, 3, i) for i in range(20)])
        assert starts.min() >= lo and starts.max() + 17 <= hi


def test_text_skips_an_undecodable_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = small_corpus(tmp_path / "corpus")
    (folder / "image.bin").write_bytes(bytes([0x89, 0x50, 0xFF, 0xFE, 0x00, 0x01]) * 50)
    with caplog.at_level("WARNING", logger="peer.tasks.text"):
        task = TextLMTask(TaskConfig(data=str(folder), seq_len=32))
    assert [Path(f).name for f, _ in task.skipped] == ["image.bin"]
    assert [Path(f).name for f in task.files] == ["a.txt", "b.txt"]
    assert "image.bin" in caplog.text


def test_text_empty_folder_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blob.dat").write_bytes(b"\x00\xff\x00")
    with pytest.raises(ConfigError, match=r"no text in .*found 1 file\(s\) \(1 skipped as not UTF-8 text"):
        TextLMTask(TaskConfig(data=str(tmp_path / "empty")))
    with pytest.raises(ConfigError, match="does not exist"):
        TextLMTask(TaskConfig(data=str(tmp_path / "missing")))
    with pytest.raises(ConfigError, match="needs a corpus"):
        TextLMTask(TaskConfig())


def test_one_file_that_is_not_utf8_text_is_called_so_not_empty(tmp_path: Path) -> None:
    (tmp_path / "latin.txt").write_bytes("\u00e9t\u00e9 caf\u00e9".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin.txt': it is not UTF-8 \(invalid continuation byte at byte 0\)"):
        TextLMTask(TaskConfig(data=str(tmp_path / "latin.txt")))


@pytest.mark.parametrize("task", ["synthetic-lm", "digits"])
def test_a_task_that_reads_no_data_refuses_a_data_path_it_would_ignore(task: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"task '{task}' reads no --data"):
        make_task(task, TaskConfig(data=str(tmp_path)))


@pytest.mark.skipif(
    not FORTUNES.is_dir(), reason=f"{FORTUNES} absent (apt-get install fortunes for a real-text corpus)"
)
def test_text_on_the_fortunes_corpus() -> None:
    task = make_task("text-lm", TaskConfig(data=str(FORTUNES)))
    assert isinstance(task, TextLMTask)
    assert task.vocab_size > 60 and len(task.files) > 10
    assert all(f.endswith(".dat") for f, _ in task.skipped)  # strfile indexes are binary
    model = task.build_model()
    before = task.evaluate(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    stream = task.batches(0, 4)
    for _ in range(20):
        loss = task.loss(model, next(stream))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert task.evaluate(model) < before - 0.5


# --- user tasks ---

USER_MODULE = '''
import torch
from peer.tasks import Task, TaskConfig


class Regression(Task):
    """y = 2x + 1 with a one-weight linear model."""

    name = "regression"

    def build_model(self):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            return torch.nn.Linear(1, 1)

    def batches(self, rank, world):
        g = torch.Generator().manual_seed(1000 * rank + world)
        while True:
            x = torch.randn(self.config.batch_size, 1, generator=g)
            yield x, 2 * x + 1

    def loss(self, model, batch):
        x, y = batch
        return torch.nn.functional.mse_loss(model(x), y)

    def eval_set(self):
        x = torch.linspace(-1, 1, 8).unsqueeze(1)
        return [(x, 2 * x + 1)]


def make(config: TaskConfig):
    return Regression(config)


class Light:
    """Not a Task: build_model, batches, evaluate only; the default LM loss applies."""

    entropy_floor = 0.5
    classes = 4

    def build_model(self):
        return torch.nn.Embedding(4, 4)

    def accuracy(self, model):
        assert not torch.is_grad_enabled() and not model.training
        return 0.75

    def partition_size(self, rank, world):
        return 10 * (rank + 1)

    def batches(self, rank, world):
        while True:
            yield torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long)

    def evaluate(self, model):
        assert not torch.is_grad_enabled() and not model.training
        return 1.25


def light(config):
    return Light()


def not_a_task(config):
    return 42


def two_args(config, other):
    return None


NOT_CALLABLE = 3


def raises(config):
    raise ValueError("no such  dataset")


class Abstract(Task):
    pass


def abstract(config):
    return Abstract(config)


class NoInit(Regression):
    def __init__(self, config):
        pass


def no_init(config):
    return NoInit(config)


class NoEval(Regression):
    eval_set = Task.eval_set


def no_eval(config):
    return NoEval(config)


class BrokenModel(Regression):
    def build_model(self):
        raise RuntimeError("CUDA out of memory")


def broken_model(config):
    return BrokenModel(config)


class NotAModel(Regression):
    def build_model(self):
        return lambda x: x


def not_a_model(config):
    return NotAModel(config)


class NoParameters(Regression):
    def build_model(self):
        return torch.nn.ReLU()


def no_parameters(config):
    return NoParameters(config)


class Complex(Regression):
    def build_model(self):
        model = super().build_model()
        model.phase = torch.nn.Parameter(torch.ones(2, dtype=torch.complex64))
        return model


def complex_(config):
    return Complex(config)


class Finite(Regression):
    def batches(self, rank, world):
        return iter(())


def finite(config):
    return Finite(config)


class WrongShape(Regression):
    def batches(self, rank, world):
        while True:
            yield torch.ones(2, 3), torch.ones(2, 1)


def wrong_shape(config):
    return WrongShape(config)


class VectorLoss(Regression):
    def loss(self, model, batch):
        x, y = batch
        return (model(x) - y) ** 2


def vector_loss(config):
    return VectorLoss(config)
'''


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    name = f"loconet_user_task_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_MODULE), encoding="utf-8")
    (tmp_path / f"{name}_broken.py").write_text("import no_such_dependency_xyz\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)
    sys.modules.pop(f"{name}_broken", None)


def test_user_task_loads_and_trains_one_step(user_module: str) -> None:
    task = make_task(f"{user_module}:make", TaskConfig(batch_size=4))
    assert isinstance(task, Task) and task.name == "regression"
    assert task.accuracy(task.build_model()) is None and task.partition_size(0, 1) is None
    model = task.build_model()
    before = [p.detach().clone() for p in model.parameters()]
    eval_before = task.evaluate(model)
    loss = task.loss(model, next(task.batches(0, 1)))
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert task.evaluate(model) < eval_before


def test_a_light_user_object_is_wrapped_into_a_task(user_module: str) -> None:
    task = make_task(f"{user_module}:light", TaskConfig(batch_size=2))
    model = task.build_model()
    assert task.evaluate(model) == 1.25 and model.training
    assert task.entropy_floor == 0.5 and task.samples_per_batch() == 2
    assert task.accuracy(model) == 0.75 and model.training
    assert task.partition_size(1, 2) == 20 and task.classes == 4
    assert task.loss(model, next(task.batches(0, 1))).ndim == 0


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("mymodule", "unknown task 'mymodule'"),
        ("my module:make", "expected 'package.module:function'"),
        ("mod:make:extra", "expected 'package.module:function'"),
        ("no_such_module_xyz.sub:make", "no module named 'no_such_module_xyz'"),
        ("{m}_broken:make", "importing .* failed: No module named 'no_such_dependency_xyz'"),
        ("{m}:missing", "has no 'missing'; callables it defines: .*light.*make"),
        ("{m}:NOT_CALLABLE", "is a value of type int, not a function or class"),
        ("{m}:two_args", "must take one argument"),
        (
            "{m}:not_a_task",
            r"returned an object of type int, not a peer.tasks.Task nor an object with build_model, batches, evaluate",
        ),
        # The user's code is tried before any peer trains: a broken part is one line naming it.
        ("{m}:raises", r"raises\(config\) raised ValueError: no such dataset$"),
        ("{m}:abstract", r"abstract\(config\) raised TypeError: Can't instantiate abstract class Abstract"),
        ("{m}:no_init", r"NoInit.__init__ must call super\(\).__init__\(config\)"),
        ("{m}:no_eval", r"NoEval defines neither eval_set\(\) nor evaluate\(\)"),
        ("{m}:broken_model", r"build_model\(\) raised RuntimeError: CUDA out of memory"),
        ("{m}:not_a_model", r"build_model\(\) returned a function, not a torch.nn.Module"),
        ("{m}:no_parameters", "the model has no parameters to train"),
        ("{m}:complex_", "parameter phase is complex"),
        ("{m}:finite", r"batches\(0, 1\) yielded no batch; it must yield batches without end"),
        (
            "{m}:wrong_shape",
            r"loss\(model, first batch\) raised RuntimeError: mat1 and mat2 shapes cannot be multiplied",
        ),
        ("{m}:vector_loss", r"loss\(model, batch\) must return a scalar tensor, got \(16, 1\)"),
    ],
)
def test_bad_user_specs_raise_helpful_config_errors(user_module: str, spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_task(spec.format(m=user_module), TaskConfig())


def test_a_resumed_train_loop_continues_its_stream_at_its_step() -> None:
    from peer.runtime.training import TrainConfig, TrainLoop

    task = SyntheticLMTask(TaskConfig())
    loop = TrainLoop(task, torch.nn.Linear(1, 1), optimizer=None, config=TrainConfig(), rank=1, world=2, start_step=4)
    assert loop.progress.step == 4
    assert torch.equal(next(loop.batches)[0], task.batch(1, 2, 4)[0])


@pytest.mark.parametrize(
    "name,factory,message",
    [
        ("mine", "peer.tasks.lm:make", "the factory of task 'mine' must be callable"),
        ("mine", None, "the factory of task 'mine' must be callable"),
        ("my:task", lambda config: None, "task names are words without ':'"),
        (" mine", lambda config: None, "task names are words without ':'"),
        ("synthetic-lm", lambda config: None, "task 'synthetic-lm' is already registered"),
    ],
)
def test_a_registration_that_cannot_work_is_refused_and_changes_nothing(name, factory, message):
    before = task_names()
    with pytest.raises(ConfigError, match=message):
        register_task(name, factory)
    assert task_names() == before


def test_the_task_help_is_built_from_the_built_in_registrations():
    # Each task that reads --data says so; the default is one of them.
    assert TASK_HELP == "synthetic-lm, text-lm (--data), digits, a plugin's registered task, or package.module:function"
    assert DEFAULT_TASK == "synthetic-lm" and DEFAULT_TASK in task_names()
