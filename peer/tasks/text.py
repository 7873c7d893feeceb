"""text-lm: a character-level language model on any UTF-8 text file or folder of them.

The corpus
    ``TaskConfig.data`` is a file or a folder. A folder is walked recursively
    (symlinked folders are not followed), its files read in sorted path order;
    a file reached twice (e.g. through a symlink) is read once. Files that are
    not UTF-8 text (undecodable, or containing NUL bytes, i.e. binary) or
    unreadable are skipped with one logged warning naming them. Texts are
    joined with a newline between files. A corpus with no text is a
    ConfigError that says what was found.

Vocabulary and held-out set
    The vocabulary is the sorted set of characters of the whole corpus (so it
    depends on the data only; ``TaskConfig.vocab_size`` is ignored and the
    model is built with ``vocab_size``). The last 10% of the characters are
    held out; the eval set is ``eval_batches * batch_size`` windows of
    ``seq_len + 1`` characters at evenly spaced positions of the held-out part
    (fixed: the same for every peer, call and seed).

Splits
    "iid": each peer samples windows uniformly from the whole training part
    with its own generator (per seed, rank, world and batch index).
    "non-iid": the training part is cut into ``world`` contiguous shards and
    peer i samples windows lying entirely inside shard i, so peers' windows
    are disjoint (different files / topics for a folder corpus).
    "by-file": for a folder, peer r reads only files i with i % world == r,
    counting (in sorted path order) the files that hold at least one window
    of training text (a file wholly in the held-out tail, or shorter than
    seq_len + 1 characters, is not dealt out). Each window lies inside one
    file, a file's share proportional to its windows. Fewer such files than
    peers is a ConfigError rather than shared files: by-file promises each
    peer its own files (use "non-iid" to cut fewer files into more shards).
    With Debian's fortunes (/usr/share/games/fortunes) each peer reads
    different fortune collections. The eval set does not depend on the split.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from collectives.errors import ConfigError
from peer.tasks.base import Batch, Task, TaskConfig, check_rank, seeded_rng
from peer.tasks.model import ModelConfig, TransformerLM, build_transformer

logger = logging.getLogger(__name__)

SEPARATOR = "\n"  # between files, so one file's last line does not run into the next file's first
HOLDOUT_FRACTION = 0.1


@dataclass(frozen=True)
class Corpus:
    """The text read from a path and what was skipped."""

    text: str
    files: tuple[str, ...]  # files whose text is in ``text``, in order
    sizes: tuple[int, ...]  # characters of each of ``files``; in ``text`` they are joined by SEPARATOR
    skipped: tuple[tuple[str, str], ...]  # (file, reason) of files that were not used


def list_files(root: Path) -> list[Path]:
    """Every file under ``root`` (or ``root`` itself), sorted by path, each real file once."""
    if root.is_file():
        return [root]
    found: list[Path] = []
    for folder, dirs, names in os.walk(root):
        dirs.sort()  # os.walk visits in this order; sorted keeps the walk deterministic
        found.extend(Path(folder) / name for name in names)
    seen: set[str] = set()
    unique: list[Path] = []
    for path in sorted(found):
        real = os.path.realpath(path)
        if real not in seen and Path(real).is_file():
            seen.add(real)
            unique.append(path)
    return unique


def read_corpus(path: str | os.PathLike[str]) -> Corpus:
    """Read a text file or every text file under a folder (see the module docstring)."""
    root = Path(path).expanduser()
    if not root.exists():
        raise ConfigError(
            f"text-lm: data path {str(root)!r} does not exist (give a UTF-8 text file or a folder of them)"
        )
    texts: list[str] = []
    used: list[str] = []
    skipped: list[tuple[str, str]] = []
    for file in list_files(root):
        try:
            text = file.read_bytes().decode("utf-8-sig")  # -sig: drop a leading byte-order mark if any
        except UnicodeDecodeError as e:
            skipped.append((str(file), f"not UTF-8 ({e.reason} at byte {e.start})"))
            continue
        except OSError as e:
            skipped.append((str(file), f"unreadable ({e.strerror or e})"))
            continue
        if "\x00" in text:
            skipped.append((str(file), "binary (contains NUL bytes)"))
            continue
        if text:
            texts.append(text)
            used.append(str(file))
    if skipped:
        shown = "; ".join(f"{f}: {why}" for f, why in skipped[:5])
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        logger.warning("text-lm: skipped %d file(s) that are not UTF-8 text: %s%s", len(skipped), shown, more)
    corpus = Corpus(SEPARATOR.join(texts), tuple(used), tuple(len(t) for t in texts), tuple(skipped))
    if not corpus.text:
        if root.is_file():  # one file: say what is wrong with it (a binary or Latin-1 file is not "empty")
            what, why = (f"it is {skipped[0][1]}", "") if skipped else ("it is an empty file", "")
        else:
            what = f"found {len(list_files(root))} file(s)"
            why = (
                f" ({len(skipped)} skipped as not UTF-8 text: {', '.join(f for f, _ in skipped[:3])})"
                if skipped else ""
            )
        raise ConfigError(f"text-lm: no text in {str(root)!r}: {what}{why}; give a UTF-8 text file or a folder of them")
    return corpus


def encode(text: str, vocab: str) -> np.ndarray:
    """Token ids (int32) of ``text`` in ``vocab`` (a sorted string of distinct characters covering the text)."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
    vocab_codes = np.frombuffer(vocab.encode("utf-32-le"), dtype="<u4")
    # vocab is sorted by code point, so the id of a character is its rank among the vocab's code points
    return np.searchsorted(vocab_codes, codes).astype(np.int32)


class TextLMTask(Task):
    """Next-character prediction on a text corpus."""

    name = "text-lm"
    splits = ("iid", "non-iid", "by-file")

    def __init__(self, config: TaskConfig) -> None:
        super().__init__(config)
        if config.data is None:
            raise ConfigError("text-lm needs a corpus: set data (--data PATH) to a UTF-8 text file or a folder of them")
        corpus = read_corpus(config.data)
        self.files = corpus.files
        self.skipped = corpus.skipped
        self.vocab = "".join(sorted(set(corpus.text)))
        tokens = encode(corpus.text, self.vocab)
        n_train = round(len(tokens) * (1.0 - HOLDOUT_FRACTION))
        self.train_tokens = tokens[:n_train]
        self.eval_tokens = tokens[n_train:]
        window = config.seq_len + 1
        # [lo, hi) of each file's training text, for files holding at least one whole window of it
        starts = np.cumsum([0] + [size + len(SEPARATOR) for size in corpus.sizes[:-1]])
        self.file_spans = tuple(
            (int(lo), int(min(lo + size, n_train)))
            for lo, size in zip(starts, corpus.sizes)
            if min(lo + size, n_train) - lo >= window
        )
        if len(self.eval_tokens) < window:
            raise ConfigError(
                f"text-lm: corpus {config.data!r} has {len(tokens)} characters; its held-out last 10% "
                f"({len(self.eval_tokens)}) is shorter than one window of seq_len + 1 = {window}: "
                f"give at least {10 * window} characters or a smaller seq_len"
            )
        logger.info(
            "text-lm: %d file(s), %d characters (%d train, %d held out), vocabulary of %d",
            len(self.files),
            len(tokens),
            n_train,
            len(self.eval_tokens),
            len(self.vocab),
        )

    @property
    def vocab_size(self) -> int:
        """Number of distinct characters in the corpus (the model's vocabulary)."""
        return len(self.vocab)

    def decode(self, tokens: torch.Tensor | np.ndarray) -> str:
        """The text of a 1-D sequence of token ids."""
        return "".join(self.vocab[int(i)] for i in np.asarray(tokens).ravel())

    def build_model(self) -> TransformerLM:
        """The default transformer at the configured size over the corpus's vocabulary, initialised from the seed."""
        return build_transformer(self.shape(), self.config.seed)

    def shape(self) -> ModelConfig:
        """The transformer's shape at the configured size, over the corpus's vocabulary."""
        c = self.config
        return ModelConfig(self.vocab_size, c.seq_len, c.d_model, c.n_layers, c.n_heads)

    def model_settings(self) -> tuple[str, ...]:
        """The transformer's shape."""
        return self.shape().settings()

    def shard_bounds(self, rank: int, world: int) -> tuple[int, int]:
        """[lo, hi) of the training part that peer ``rank``'s windows come from: whole part ("iid"), a shard."""
        check_rank(rank, world)
        n = len(self.train_tokens)
        if self.config.split == "iid":
            return 0, n
        return rank * n // world, (rank + 1) * n // world

    def spans(self, rank: int, world: int) -> list[tuple[int, int]]:
        """The [lo, hi) ranges of the training part peer ``rank``'s windows lie in (its files for "by-file")."""
        check_rank(rank, world)
        if self.config.split != "by-file":
            return [self.shard_bounds(rank, world)]
        if len(self.file_spans) < world:
            raise ConfigError(
                f"text-lm: split 'by-file' gives each peer its own files, but {self.config.data!r} has "
                f"{len(self.file_spans)} file(s) with a window of training text (of {len(self.files)} read; "
                f"files shorter than seq_len + 1 = {self.config.seq_len + 1} characters or in the held-out "
                f"last 10% do not count) for {world} peers: use fewer peers, more files, or split 'non-iid'"
            )
        return list(self.file_spans[rank::world])

    def window_starts(self, rank: int, world: int, index: int) -> np.ndarray:
        """Start offsets (into the training part) of the windows of batch ``index`` of peer ``rank``."""
        spans = self.spans(rank, world)
        window = self.config.seq_len + 1
        rng = seeded_rng(self.config.seed, "text-train", rank, world, index)
        if len(spans) == 1:
            lo, hi = spans[0]
            if hi - lo < window:
                raise ConfigError(
                    f"text-lm: peer {rank} of {world} gets {hi - lo} training characters, fewer than one window "
                    f"(seq_len + 1 = {window}); use a larger corpus, fewer peers, a smaller seq_len or split='iid'"
                )
            return rng.integers(lo, hi - window + 1, size=self.config.batch_size)
        # uniform over the union of every span's window starts (each span holds at least one)
        lows = np.array([lo for lo, _ in spans], dtype=np.int64)
        counts = np.array([hi - lo - window + 1 for lo, hi in spans], dtype=np.int64)
        ends = np.cumsum(counts)
        picks = rng.integers(0, int(ends[-1]), size=self.config.batch_size)
        which = np.searchsorted(ends, picks, side="right")
        return lows[which] + picks - (ends - counts)[which]

    def batch(self, rank: int, world: int, index: int) -> Batch:
        """Training batch number ``index`` of peer ``rank`` of ``world`` (what ``batches`` yields at that step)."""
        return _windows(self.train_tokens, self.window_starts(rank, world, index), self.config.seq_len + 1)

    def batches(self, rank: int, world: int, start: int = 0) -> Iterator[Batch]:
        """Infinite stream of batches ``start, start + 1, ...`` (start > 0 resumes a stream)."""
        self.window_starts(rank, world, start)  # fail here, not at the first next(), on a bad rank or tiny shard
        return _stream(self, rank, world, start)

    def eval_set(self) -> Sequence[Batch]:
        """Evenly spaced windows of the held-out part, ``batch_size`` per batch; the same for everyone."""
        c = self.config
        window = c.seq_len + 1
        starts = np.linspace(0, len(self.eval_tokens) - window, c.eval_batches * c.batch_size).round().astype(np.int64)
        return [_windows(self.eval_tokens, chunk, window) for chunk in np.split(starts, c.eval_batches)]


def _stream(task: TextLMTask, rank: int, world: int, index: int) -> Iterator[Batch]:
    while True:
        yield task.batch(rank, world, index)
        index += 1


def _windows(tokens: np.ndarray, starts: np.ndarray, window: int) -> Batch:
    seqs = torch.from_numpy(tokens[starts[:, None] + np.arange(window)].astype(np.int64))
    return seqs[:, :-1].contiguous(), seqs[:, 1:].contiguous()
