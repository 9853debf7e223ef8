"""Token arrays, random training batches, deterministic evaluation windows and reference metrics."""

import math

import numpy as np
import torch

from samoe.errors import DataError


def encode_documents(tok, docs: list[str], chunk: int = 1024) -> np.ndarray:
    """All documents as one 1-D array: tokens(doc_0) eot tokens(doc_1) eot ...

    dtype is uint16 when vocab_size < 65536, else uint32. Documents are encoded `chunk` at a time.
    """
    dtype = np.uint16 if tok.vocab_size < 2**16 else np.uint32
    eot = np.array([tok.eot_id], dtype=dtype)
    parts = []
    for i in range(0, len(docs), chunk):
        for ids in tok.encode_batch(docs[i : i + chunk]):
            parts += [np.asarray(ids, dtype=dtype), eot]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


class TokenStream:
    """A 1-D token array (numpy, may be a memmap) read as next-token-prediction windows.

    A window of length S is x = tokens[s : s+S], y = tokens[s+1 : s+S+1]; x and y are
    int64 CPU tensors. `name` (e.g. "validation split") appears in errors.
    """

    def __init__(self, tokens: np.ndarray, name: str = "token stream"):
        self.tokens = tokens
        self.name = name
        self._epoch: tuple[tuple, tuple[int, np.ndarray]] | None = None  # epoch_batch's current epoch

    def __len__(self) -> int:
        return len(self.tokens)

    def _check(self, seq_len: int) -> None:
        if len(self.tokens) < seq_len + 1:
            raise DataError(
                f"{self.name} has {len(self.tokens)} tokens; seq_len {seq_len} needs at least {seq_len + 1}"
            )

    def _windows(self, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.from_numpy(self.tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64))
        return w[:, :-1], w[:, 1:]

    def sample_batch(self, batch_size: int, seq_len: int, generator: torch.Generator):
        """(x, y), each [batch_size, seq_len], at start offsets uniform in [0, len - seq_len - 1]
        drawn with torch.randint from `generator` (save/restore its get_state() to resume exactly)."""
        self._check(seq_len)
        starts = torch.randint(len(self.tokens) - seq_len, (batch_size,), generator=generator)
        return self._windows(starts.numpy(), seq_len)

    def epoch_batch(self, step: int, batch_size: int, seq_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), each [batch_size, seq_len]: the windows of training step `step` when every epoch
        reads each of M = (len - seq_len) // seq_len non-overlapping windows once, in a shuffled order.

        Epoch k starts its windows at o_k + seq_len·i (i < M) with a phase o_k in [0, seq_len) and
        reads them in the order of a random permutation, both drawn from a generator seeded with
        (seed, k); step t takes the windows t·B ... t·B + B - 1 of the epochs read one after
        another. A function of (seed, step) alone, so a resumed run reads what an uninterrupted
        one would, with no sampler state to save."""
        self._check(seq_len)
        m = max(1, (len(self.tokens) - seq_len) // seq_len)
        starts = np.empty(batch_size, dtype=np.int64)
        for j, i in enumerate(range(step * batch_size, (step + 1) * batch_size)):
            epoch, pos = divmod(i, m)
            phase, order = self._epoch_order(epoch, m, seq_len, seed)
            starts[j] = phase + seq_len * order[pos]
        return self._windows(starts, seq_len)

    def _epoch_order(self, epoch: int, m: int, seq_len: int, seed: int) -> tuple[int, np.ndarray]:
        """(phase, window order) of one epoch; the last epoch asked for is kept."""
        key = (epoch, m, seq_len, seed)
        if self._epoch is None or self._epoch[0] != key:
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            room = len(self.tokens) - 1 - seq_len * m  # the phase keeps the last window's target in range
            phase = int(torch.randint(min(seq_len, room + 1), (1,), generator=g))
            self._epoch = key, (phase, torch.randperm(m, generator=g).numpy())
        return self._epoch[1]

    def num_eval_windows(self, seq_len: int, max_tokens: int | None = None) -> int:
        """Full windows used by eval_batches: (len - 1) // seq_len, capped at max_tokens // seq_len
        (but at least 1). The tail that does not fill a window is dropped."""
        self._check(seq_len)
        n = (len(self.tokens) - 1) // seq_len
        return n if max_tokens is None else max(1, min(n, max_tokens // seq_len))

    def eval_batches(self, batch_size: int, seq_len: int, max_tokens: int | None = None, spread: bool = False):
        """Yield (x, y) of [<= batch_size, seq_len] for num_eval_windows(seq_len, max_tokens)
        non-overlapping windows, each target token predicted at most once. Deterministic.

        The split holds M = num_eval_windows(seq_len) windows, starting at 0, seq_len, 2*seq_len, ...
        Of them the first n are used, or with `spread` n spaced evenly over all M (window
        floor(i·M/n) for i < n): on a mixture whose documents come one source after another,
        the first n windows hold its first sources only. With n = M both are every window."""
        n, m = self.num_eval_windows(seq_len, max_tokens), self.num_eval_windows(seq_len)
        index = np.arange(n) * m // n if spread else np.arange(n)
        for i in range(0, n, batch_size):
            yield self._windows(index[i:i + batch_size] * seq_len, seq_len)


def unigram_perplexity(targets: np.ndarray, vocab_size: int) -> float:
    """exp(-sum_v p_v log p_v) with p_v = c_v / N, the empirical unigram distribution of targets.

    This is the perplexity of the best context-free predictor on these very tokens: the
    reference a language model must beat to have learned anything from context.
    """
    counts = np.bincount(np.asarray(targets, dtype=np.int64), minlength=vocab_size)
    p = counts[counts > 0] / counts.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def bits_per_byte(total_nll_nats: float, total_bytes: int) -> float:
    """total_nll / ln 2 / total_bytes: tokenizer-independent loss (bytes from token_bytes())."""
    return total_nll_nats / math.log(2) / total_bytes
