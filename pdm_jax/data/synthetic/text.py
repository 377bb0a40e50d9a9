"""Text side of the synthetic world: a word-level tokenizer and a frozen random text encoder.

These stand in for CLIP's tokenizer and text tower without any download. The encoder is
fixed (built from a seed, never trained) and, like CLIP's last hidden state, gives every
token an O(1), layer-normalised feature that carries its word, its position, its
neighbours and the whole caption; the empty caption ``""`` (``[bos, eos, pad, …]``) gives
the unconditional context, which is therefore never zeros.
"""

import re
from collections.abc import Sequence

import numpy as np

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<unk>", "<bos>", "<eos>")
_WORD = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")


class WordTokenizer:
    """Lower-cased words (hyphenated words stay whole) → ids, CLIP-style framing.

    A caption becomes ``[bos, w_1, …, w_n, eos, pad, …]`` of exactly ``length`` ids;
    captions that do not fit are truncated and still end with ``eos``. Words outside the
    vocabulary map to ``unk``.
    """

    def __init__(self, words: Sequence[str], length: int):
        """Builds the vocabulary.

        Args:
          words: the vocabulary words (duplicates are dropped, order kept); ids start after
            the four special tokens.
          length: fixed token count T (``num_clip_token``), at least 2.
        """
        if length < 2:
            raise ValueError(f"Token length {length} must be at least 2 (bos and eos).")
        vocab = list(dict.fromkeys(w.lower() for w in words))
        bad = [w for w in vocab if not _WORD.fullmatch(w) or w in SPECIAL_TOKENS]
        if bad:
            raise ValueError(f"Vocabulary words must be plain lower-case words; got {bad}.")
        self.length = length
        self.vocab: tuple[str, ...] = (*SPECIAL_TOKENS, *vocab)
        self._ids = {w: i for i, w in enumerate(self.vocab)}

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""
        return len(self.vocab)

    @staticmethod
    def words(text: str) -> list[str]:
        """Splits text into lower-case words; punctuation separates and is dropped."""
        return _WORD.findall(text.lower())

    def tokenize(self, text: str) -> np.ndarray:
        """One caption → int32 [T] ids (see the class docstring).

        Args:
          text: the caption.

        Returns:
          int32 [T].
        """
        ids = [self._ids.get(w, UNK_ID) for w in self.words(text)][: self.length - 2]
        out = np.full((self.length,), PAD_ID, dtype=np.int32)
        out[: len(ids) + 2] = [BOS_ID, *ids, EOS_ID]
        return out

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """Captions → int32 [B, T] ids."""
        if isinstance(texts, str):
            raise TypeError("Pass a list of captions; use tokenize() for a single one.")
        ids = [self.tokenize(t) for t in texts]
        return np.array(ids, dtype=np.int32).reshape(len(ids), self.length)

    def decode(self, tokens: np.ndarray) -> str:
        """int [T] ids → the words between ``bos`` and ``eos``, space separated."""
        words = []
        for i in np.asarray(tokens).tolist():
            if i == EOS_ID:
                break
            if i not in (PAD_ID, BOS_ID):
                words.append(self.vocab[i] if 0 <= i < self.vocab_size else SPECIAL_TOKENS[1])
        return " ".join(words)


def sinusoidal_positions(length: int, dim: int) -> np.ndarray:
    """Fixed transformer position codes, float32 [length, dim]: ``[sin | cos]`` halves."""
    half = dim // 2
    freqs = np.exp(-np.log(10_000.0) * np.arange(half, dtype=np.float64) / max(half, 1))
    angles = np.arange(length, dtype=np.float64)[:, None] * freqs[None, :]  # [T, half]
    codes = np.concatenate([np.sin(angles), np.cos(angles)], axis=-1)
    return np.pad(codes, [(0, 0), (0, dim - 2 * half)]).astype(np.float32)


class FrozenTextEncoder:
    """A fixed random text tower: ids [..., T] → float32 [..., T, D] features.

    ``h_t = E[x_t] + P_t + ½ Σ_{k=±1,±2} w_k ⊙ E[x_{t+k}] + ½ g ⊙ mean_{s: x_s ≠ pad} E[x_s]``,
    then a layer norm over D without affine. ``E`` ~ N(0, 1) [V, D], ``w_k`` and ``g`` ~
    N(0, 1) [D], all from ``seed``; ``P`` = :func:`sinusoidal_positions`. The neighbour term
    binds a word to its phrase ("big ball top-left"), the mean term gives every token (pads
    included, as in CLIP) the caption's gist.
    """

    WINDOW = (-2, -1, 1, 2)

    def __init__(self, vocab_size: int, length: int, dim: int, seed: int = 0):
        """Draws the fixed tables.

        Args:
          vocab_size: number of token ids V.
          length: token count T.
          dim: feature size D (``clip_dim``).
          seed: seed of the tables (keep it fixed: checkpoints depend on it).
        """
        rng = np.random.default_rng(seed)
        self.length, self.dim = length, dim
        self.embedding = rng.standard_normal((vocab_size, dim)).astype(np.float32)  # [V, D]
        self.neighbour = rng.standard_normal((len(self.WINDOW), dim)).astype(np.float32)
        self.gist = rng.standard_normal((dim,)).astype(np.float32)
        self.positions = sinusoidal_positions(length, dim)  # [T, D]

    def __call__(self, tokens: np.ndarray) -> np.ndarray:
        """Encodes token ids.

        Args:
          tokens: int [..., T] ids.

        Returns:
          float32 [..., T, D] features, zero mean and unit variance over D per token.
        """
        tokens = np.asarray(tokens)
        if tokens.shape[-1:] != (self.length,):
            raise ValueError(f"Expected token ids [..., {self.length}], got {tokens.shape}.")
        e = self.embedding[tokens]  # [..., T, D]
        h = e + self.positions
        # Neighbour k of token t is e[t + k] (zero beyond the ends): slices of one padded copy.
        reach = max(abs(k) for k in self.WINDOW)
        padded = np.zeros((*e.shape[:-2], self.length + 2 * reach, self.dim), np.float32)
        padded[..., reach : reach + self.length, :] = e
        for k, w in zip(self.WINDOW, self.neighbour, strict=True):
            h += 0.5 * w * padded[..., reach + k : reach + k + self.length, :]
        content = (tokens != PAD_ID)[..., None].astype(np.float32)  # [..., T, 1]
        mean = np.sum(e * content, axis=-2, keepdims=True) / np.maximum(
            np.sum(content, axis=-2, keepdims=True), 1.0
        )
        h += 0.5 * self.gist * mean
        # Layer norm over D (the sums np.mean / np.var take, without their call overhead).
        h -= np.add.reduce(h, axis=-1, keepdims=True) / self.dim
        centred = h - np.add.reduce(h, axis=-1, keepdims=True) / self.dim
        h /= np.sqrt(np.add.reduce(centred * centred, axis=-1, keepdims=True) / self.dim + 1e-5)
        return h.astype(np.float32)
