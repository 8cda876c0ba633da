"""R2DL: representation reprogramming via dictionary learning (Vinod, Chen, Das 2020).

A frozen text classifier (the *source*, token embedding matrix V_S of shape |V_S| x H) is reused
for a sequence task over a small alphabet V_T (amino acids). Only Θ (|V_T| x |V_S|) is learned:
target token t enters the source as the word vector θ_t · V_S, a k-sparse combination of source
token embeddings. A target sequence becomes ``[CLS] θ_{t1}V_S ... θ_{tn}V_S [SEP]`` (the source's
own [CLS]/[SEP] vectors), the source's class probabilities go through a label mapping h
(:mod:`robust_surgery.reprogram.mapping`), and the loss is cross-entropy on h. Each Adam step on
Θ is followed by a projection of every row back to k non-zeros: orthogonal matching pursuit of the
row's dense embedding θ_t · V_S against the fixed V_S (:func:`robust_surgery.reprogram.omp.omp`).
V_S is never updated (unlike the public release's k-SVD step).

Entry points: :func:`run_r2dl` (data, split, training, evaluation: what ``surgery reprogram
r2dl`` calls), :func:`composition_baseline`, :func:`save_r2dl` / :func:`load_r2dl`.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from robust_surgery._json import strict_dumps
from robust_surgery._files import atomic_path, check_output_path
from robust_surgery.data.resolve import resolve_sequence_task
from robust_surgery.data.sequences import (AMINO_ACIDS, PeptideTask, composition_features, encode_sequences,
                                          physicochemical_features, stratified_split)
from robust_surgery.reprogram.mapping import LabelMapping, frequency_mapping, one_to_one, random_mapping
from robust_surgery.reprogram.omp import omp, sparse_to_dense
from robust_surgery.errors import InvalidInputError, InvalidTypeError, MissingFileError

__all__ = [
    "R2DLConfig",
    "R2DLModel",
    "R2DLProgram",
    "R2DLResult",
    "BASELINES",
    "classical_baselines",
    "composition_baseline",
    "evaluate_r2dl",
    "load_r2dl",
    "load_sequence_source",
    "run_r2dl",
    "save_r2dl",
    "train_r2dl",
]

FORMAT = "robust-surgery/r2dl/1"
MANIFEST_KEY = "robust_surgery"
MAPPINGS = ("one-to-one", "frequency", "random")


# --------------------------------------------------------------------------------------------
# Program and pipeline
# --------------------------------------------------------------------------------------------
class R2DLProgram(nn.Module):
    """Θ ``(n_tokens, |V_S|)`` over the fixed source embeddings V_S ``(|V_S|, H)`` (a buffer).

    ``k``: non-zeros per row kept by :meth:`project_` (``None``: dense Θ, never projected).
    ``init_ids``: one source token per target token (Θ starts as those one-hot rows, e.g. the
    letter tokens 'a', 'c', ...); without it each row starts as the mean of k (or 10) random
    source tokens (seeded). ``cls_id``/``sep_id``: the source tokens wrapped around a sequence.
    """

    def __init__(self, v_source: torch.Tensor, n_tokens: int, k: int | None, cls_id: int, sep_id: int,
                 init_ids: list[int] | None = None, seed: int = 0):
        super().__init__()
        n_vocab, _ = v_source.shape
        if k is not None and not 1 <= k <= min(n_vocab, v_source.shape[1]):
            raise InvalidInputError(f"k must be between 1 and {min(n_vocab, v_source.shape[1])} (the embedding size), got {k}")
        self.k = k
        self.cls_id, self.sep_id = int(cls_id), int(sep_id)
        self.register_buffer("v_source", v_source.detach().clone(), persistent=False)
        theta = torch.zeros(n_tokens, n_vocab)
        if init_ids is not None:
            if len(init_ids) != n_tokens:
                raise InvalidInputError(f"init_ids has {len(init_ids)} entries for {n_tokens} target tokens")
            theta[torch.arange(n_tokens), torch.tensor(init_ids)] = 1.0
        else:
            g = torch.Generator().manual_seed(seed)
            m = k or 10
            for t in range(n_tokens):
                theta[t, torch.randperm(n_vocab, generator=g)[:m]] = 1.0 / m
        self.theta = nn.Parameter(theta)

    @property
    def n_tokens(self) -> int:
        return self.theta.shape[0]

    def token_embeddings(self) -> torch.Tensor:
        """The target tokens' word vectors Θ · V_S, ``(n_tokens, H)``."""
        return self.theta @ self.v_source

    @torch.no_grad()
    def project_(self) -> None:
        """Replace every row of Θ by the k-sparse OMP code of its embedding θ_t·V_S (no-op if dense)."""
        if self.k is None:
            return
        idx, val = omp(self.token_embeddings(), self.v_source, self.k)
        self.theta.copy_(sparse_to_dense(idx, val.to(self.theta.dtype), self.theta.shape[1]))

    def sparse_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(indices (n_tokens, k), values (n_tokens, k))`` of a projected Θ (the k largest |θ| per row)."""
        if self.k is None:
            raise InvalidInputError("a dense program has no k-sparse rows")
        theta = self.theta.detach()
        idx = theta.abs().topk(self.k, dim=1).indices
        return idx, theta.gather(1, idx)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Target ids ``(B, L)`` and mask ``(B, L)`` (right-padded) -> source input embeddings
        ``(B, L + 2, H)`` of ``[CLS] tokens [SEP]`` and their attention mask ``(B, L + 2)``."""
        b, length = ids.shape
        tokens = self.token_embeddings()[ids]  # (B, L, H)
        h = tokens.shape[-1]
        cls = self.v_source[self.cls_id].expand(b, 1, h)
        body = torch.cat([cls, tokens, tokens.new_zeros(b, 1, h)], dim=1)
        sep_pos = mask.sum(dim=1)[:, None] + 1  # (B, 1): the first position after the sequence
        pos = torch.arange(length + 2, device=ids.device)[None, :]
        body = torch.where((pos == sep_pos)[..., None], self.v_source[self.sep_id], body)
        return body, (pos <= sep_pos).long()


class R2DLModel(nn.Module):
    """program -> frozen source (eval mode, no parameter gradients) -> softmax -> label mapping.

    ``forward(ids (B, L), mask (B, L))`` -> target-class probabilities ``(B, n_target)`` (the mean
    source probability of each class's source labels).
    """

    def __init__(self, program: R2DLProgram, source: nn.Module, mapping: LabelMapping):
        super().__init__()
        self.program = program
        self.source = source.eval()
        for p in self.source.parameters():
            p.requires_grad_(False)
        self.mapping = mapping

    def train(self, mode: bool = True):
        super().train(mode)
        self.source.eval()  # the source never leaves eval mode (no dropout, frozen statistics)
        return self

    def source_probs(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The source's class probabilities ``(B, n_source)`` on the programmed sequences."""
        emb, m = self.program(ids, mask)
        return F.softmax(self.source(inputs_embeds=emb, attention_mask=m), dim=-1)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.mapping(self.source_probs(ids, mask))


def _check_source(source: nn.Module) -> None:
    missing = [a for a in ("word_embeddings", "cls_token_id", "sep_token_id") if not hasattr(source, a)]
    if missing:
        raise InvalidInputError(f"R2DL needs a text classifier with a token embedding matrix: the source lacks "
                         f"{', '.join(missing)} (and must accept inputs_embeds= and attention_mask=); "
                         "use zoo:minilm-sentiment")


def load_sequence_source(spec: str = "zoo:minilm-sentiment", random_encoder: bool = False, seed: int = 0,
                         data_root: str | None = None, trust_code: bool = False, trust_pickle: bool = False
                         ) -> nn.Module:
    """The source classifier of ``spec``; ``random_encoder``: the same model with its encoder's
    weights replaced by BERT's random initialisation (seeded), the trained head kept: the control.
    ``trust_code``/``trust_pickle`` as in :func:`robust_surgery.load_model`."""
    from robust_surgery.io.model_file import load_model

    source = load_model(spec, data_root=data_root, trust_code=trust_code, trust_pickle=trust_pickle)
    _check_source(source)
    if random_encoder:
        from robust_surgery.model_zoo.minilm import load_minilm_encoder

        if not hasattr(source, "bert"):
            raise InvalidInputError(f"--random-encoder needs a MiniLM-based source such as zoo:minilm-sentiment, not {spec}")
        source.bert = load_minilm_encoder(pretrained=False, seed=seed)
    return source.eval()


@torch.inference_mode()
def _n_source_classes(source: nn.Module) -> int:
    """Number of source classes, from one forward pass on ``[CLS] [SEP]``."""
    v = source.word_embeddings
    emb = torch.stack([v[source.cls_token_id], v[source.sep_token_id]])[None]
    return int(source(inputs_embeds=emb, attention_mask=torch.ones(1, 2, dtype=torch.long)).shape[-1])


def _letter_init_ids(source: nn.Module, alphabet: str) -> list[int] | None:
    """Source token ids of the lower-case letters of ``alphabet`` (+ [UNK] for "other"), if the
    source exposes a WordPiece vocabulary; None otherwise."""
    vocab = getattr(source, "vocab", None)
    if not isinstance(vocab, dict):
        return None
    if not all(ch.lower() in vocab for ch in alphabet):
        return None
    return [vocab[ch.lower()] for ch in alphabet] + [vocab.get("[UNK]", 0)]


# --------------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------------
@dataclass
class R2DLConfig:
    """R2DL settings. ``k``: non-zeros per row of Θ; ``dense``: no projection (the dense-Θ variant);
    ``omp_every``: Adam steps between OMP projections (1: after every step, the method as
    described; the final Θ is always projected); ``max_len``: sequences are cut to their first
    ``max_len`` residues (CPU cost); ``lr``: Adam's step size on Θ; ``n_train``/``n_test``:
    stratified subsamples (None: everything)."""

    k: int = 10
    dense: bool = False
    omp_every: int = 1
    epochs: int = 1
    batch_size: int = 32
    lr: float = 1e-3
    max_len: int = 64
    mapping: str = "one-to-one"
    init: str = "letters"
    seed: int = 0
    test_fraction: float = 0.2
    n_train: int | None = None
    n_test: int | None = None
    random_encoder: bool = False

    def check(self) -> "R2DLConfig":
        for name in ("k", "omp_every", "epochs", "batch_size", "max_len"):
            if getattr(self, name) < 1:
                raise InvalidInputError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise InvalidInputError(f"lr must be positive, got {self.lr}")
        if self.mapping not in MAPPINGS:
            raise InvalidInputError(f"unknown mapping {self.mapping!r}; use one of {', '.join(MAPPINGS)}")
        if self.init not in ("letters", "random"):
            raise InvalidInputError(f"unknown init {self.init!r}; use letters or random")
        return self


def train_r2dl(model: R2DLModel, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, *,
               epochs: int = 1, batch_size: int = 32, lr: float = 1e-3, omp_every: int = 1, seed: int = 0,
               progress: bool = False, amp: str | torch.dtype | None = None) -> list[dict]:
    """Train Θ of ``model.program`` on target ids ``(N, L)``, mask ``(N, L)``, labels ``(N,)``.

    Adam on Θ, cross-entropy on the mapped probabilities (``-log h_y``), seeded shuffling; after
    every ``omp_every``-th step (and after the last) a k-sparse program is projected by OMP.
    Returns one record per step: ``{"step", "epoch", "loss"}`` (loss before the update). Runs where
    Θ is (batches are moved there); ``amp`` (``bf16``/``fp16``): the source under autocast.
    """
    from robust_surgery._device import autocast
    from robust_surgery._loops import training_progress

    program = model.program
    dev = program.theta.device
    opt = torch.optim.Adam([program.theta], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    n = len(labels)
    steps = math.ceil(n / batch_size)
    history, step = [], 0
    model.train()
    with training_progress(progress) as bar:
        for epoch in range(epochs):
            task = bar.add_task(f"R2DL epoch {epoch + 1}/{epochs}", total=steps, loss=float("nan"))
            perm = torch.randperm(n, generator=gen)
            for s in range(steps):
                idx = perm[s * batch_size:(s + 1) * batch_size]
                width = int(mask[idx].sum(dim=1).max())
                with autocast(dev, amp):
                    probs = model(ids[idx, :width].to(dev), mask[idx, :width].to(dev)).float()
                loss = F.nll_loss(torch.log(probs.clamp_min(1e-12)), labels[idx].to(dev))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                if program.k is not None and (step % omp_every == 0 or (epoch == epochs - 1 and s == steps - 1)):
                    program.project_()
                history.append({"step": step, "epoch": epoch + 1, "loss": float(loss.detach())})
                bar.update(task, advance=1, loss=history[-1]["loss"])
    model.eval()
    return history


@torch.inference_mode()
def evaluate_r2dl(model: R2DLModel, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                  batch_size: int = 128, amp: str | torch.dtype | None = None) -> dict:
    """Accuracy (fraction), ROC AUC of the class-1 probability (binary tasks; None otherwise) and n;
    runs where the model is (``amp``: autocast)."""
    from robust_surgery._device import autocast

    model.eval()
    dev = model.program.theta.device
    order = torch.argsort(mask.sum(dim=1))  # similar lengths together: less padding
    probs = torch.empty(len(labels), model.mapping.n_target)
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        width = int(mask[idx].sum(dim=1).max())
        with autocast(dev, amp):
            probs[idx] = model(ids[idx, :width].to(dev), mask[idx, :width].to(dev)).float().cpu()
    return _scores(probs.numpy(), labels.numpy())


def _scores(probs: np.ndarray, labels: np.ndarray) -> dict:
    from sklearn.metrics import roc_auc_score

    acc = float((probs.argmax(axis=1) == labels).mean())
    auc = None
    if probs.shape[1] == 2 and len(np.unique(labels)) == 2:
        p1 = probs[:, 1] / np.clip(probs.sum(axis=1), 1e-12, None)
        auc = float(roc_auc_score(labels, p1))
    return {"accuracy": acc, "auc": auc, "n": int(len(labels))}


def _baseline_classifier(model: str, seed: int):
    """A fresh scikit-learn classifier for a key of ``BASELINE_MODELS``."""
    from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if model == "lr":
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, random_state=seed))
    if model == "random-forest":
        return RandomForestClassifier(n_estimators=500, random_state=seed, n_jobs=1)
    return HistGradientBoostingClassifier(max_iter=300, early_stopping=False, random_state=seed)


# baseline model key -> the name it is reported under
BASELINE_MODELS = {"lr": "LR", "random-forest": "random forest", "gradient-boosting": "gradient boosting"}


def composition_baseline(train: PeptideTask, test: PeptideTask, dipeptides: bool = False, seed: int = 0, *,
                         model: str = "lr", physchem: bool = False) -> dict:
    """A classical classifier on amino-acid (+ ``dipeptides``) composition, plus with ``physchem``
    the global physico-chemical descriptors (length, charge, hydropathy, hydrophobic moment...;
    :func:`~robust_surgery.data.sequences.physicochemical_features`): the baselines reported
    beside R2DL. ``model``: ``lr`` (logistic regression on standardised features, C = 1),
    ``random-forest`` (500 trees) or ``gradient-boosting`` (scikit-learn's histogram gradient
    boosting, 300 rounds, early stopping off). Returns accuracy, AUC, n, seconds and the name."""
    if model not in BASELINE_MODELS:
        raise InvalidInputError(f"unknown baseline model {model!r}; choose one of {', '.join(BASELINE_MODELS)}")

    def features(task: PeptideTask) -> np.ndarray:
        f = composition_features(task.sequences, dipeptides)
        return np.hstack([f, physicochemical_features(task.sequences)]) if physchem else f

    t0 = time.time()
    clf = _baseline_classifier(model, seed)
    clf.fit(features(train), train.labels.numpy())
    probs = clf.predict_proba(features(test))
    feats = "composition" + (" + dipeptides" if dipeptides else "") + (" + physico-chemical" if physchem else "")
    return {**_scores(probs, test.labels.numpy()), "seconds": time.time() - t0,
            "method": f"{feats} {BASELINE_MODELS[model]}"}


# (model, dipeptides, physchem) of the baselines fitted beside every R2DL run
BASELINES = (("lr", False, False), ("lr", True, False), ("random-forest", True, True), ("gradient-boosting", True, True))


def classical_baselines(train: PeptideTask, test: PeptideTask, seed: int = 0) -> list[dict]:
    """Every baseline of ``BASELINES`` on one split (:func:`composition_baseline`; about a minute on
    one core for the 5228 AMP training peptides, the forests taking most of it)."""
    return [composition_baseline(train, test, dip, seed, model=m, physchem=ph) for m, dip, ph in BASELINES]


# --------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------
@dataclass
class R2DLResult:
    """A trained R2DL model with its test metrics, training history and provenance."""

    model: R2DLModel
    metrics: dict
    history: list[dict]
    config: R2DLConfig
    source: str
    task: dict
    seconds: float
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """JSON-able report (no tensors)."""
        losses = [h["loss"] for h in self.history]
        tail = max(1, len(losses) // 10)
        return {
            "method": "R2DL", "source": self.source, "task": self.task,
            "variant": _variant(self.config), "config": asdict(self.config), **self.metrics,
            "first_loss": float(np.mean(losses[:tail])) if losses else None,
            "last_loss": float(np.mean(losses[-tail:])) if losses else None,
            "steps": len(losses), "seconds": self.seconds, **self.extra,
        }


def _variant(c: R2DLConfig) -> str:
    enc = "random encoder" if c.random_encoder else "pretrained"
    return f"{'dense Θ' if c.dense else f'k={c.k}'}, {enc}"


def _subsample(idx: torch.Tensor, labels: torch.Tensor, n: int | None, seed: int) -> torch.Tensor:
    if n is None or n >= len(idx):
        return idx
    if n < 2:
        raise InvalidInputError(f"a subsample needs at least 2 points, got {n}")
    keep, _ = stratified_split(labels[idx], test_fraction=1.0 - n / len(idx), seed=seed)
    return idx[keep]


def split_task(task: PeptideTask, config: R2DLConfig) -> tuple[PeptideTask, PeptideTask]:
    """The fixed stratified train/test split of ``task`` (seed ``config.seed``), subsampled to
    ``n_train``/``n_test`` (stratified, seeded) when those are set."""
    train_idx, test_idx = stratified_split(task.labels, config.test_fraction, config.seed)
    train_idx = _subsample(train_idx, task.labels, config.n_train, config.seed)
    test_idx = _subsample(test_idx, task.labels, config.n_test, config.seed)
    return task.subset(train_idx), task.subset(test_idx)


def _build_mapping(config: R2DLConfig, n_target: int, n_source: int, model_for_freq=None) -> LabelMapping:
    if config.mapping == "one-to-one":
        return one_to_one(n_target, n_source)
    if config.mapping == "random":
        return random_mapping(n_target, n_source, 1, config.seed)
    model, ids, mask, labels = model_for_freq
    dev = model.program.theta.device
    with torch.inference_mode():
        pred = torch.cat([model.source_probs(ids[i:i + 128].to(dev), mask[i:i + 128].to(dev)).argmax(1).cpu()
                          for i in range(0, len(ids), 128)])
    return frequency_mapping(pred, labels, n_target, n_source)


def run_r2dl(source: str | nn.Module = "zoo:minilm-sentiment", target: str | PeptideTask = "amp",
             config: R2DLConfig | None = None, *, data_root: str | os.PathLike | None = None,
             progress: bool = False, trust_code: bool = False, trust_pickle: bool = False,
             device: str | torch.device | None = "auto", amp: str | torch.dtype | None = None) -> R2DLResult:
    """Reprogram ``source`` for the peptide task ``target`` (``amp``, ``toxicity``, a path, or a
    :class:`PeptideTask`) with R2DL and evaluate it on the task's fixed test split.

    The alphabet is the 20 amino acids plus one "other" token; sequences are cut to
    ``config.max_len``. Θ starts from the letter tokens ('a', 'c', ...; ``init="letters"``) when
    the source has a vocabulary. The mapping (one-to-one: target class j <- source class j;
    frequency: BAR's greedy mapping from the initial program's predictions; random) is fixed
    before training. Returns an :class:`R2DLResult` (test accuracy and AUC in ``metrics``).
    ``trust_code``/``trust_pickle`` as in :func:`robust_surgery.load_model`, for a source given as a file.
    ``device`` (``auto``, ``cpu``, ``cuda[:N]``; None: where the source is) and ``amp`` (``bf16``/``fp16``
    autocast of the source) say where and how the source runs; Θ trains in float32.
    """
    from robust_surgery._device import amp_name, resolve_device

    amp_name(amp)  # a bad word fails before anything loads
    config = (config or R2DLConfig()).check()
    t0 = time.time()
    torch.manual_seed(config.seed)
    spec = source if isinstance(source, str) else getattr(source, "_r2dl_spec", "<module>")
    if isinstance(source, str):
        source = load_sequence_source(source, config.random_encoder, config.seed, data_root, trust_code=trust_code,
                                      trust_pickle=trust_pickle)
    elif config.random_encoder:
        raise InvalidInputError("random_encoder needs a source spec (it rebuilds the encoder); pass a string")
    _check_source(source)
    if device is not None:
        source.to(resolve_device(device))
    task = resolve_sequence_task(target, data_root)
    train, test = split_task(task, config)
    alphabet = AMINO_ACIDS
    tr_ids, tr_mask = encode_sequences(train.sequences, alphabet, config.max_len)
    te_ids, te_mask = encode_sequences(test.sequences, alphabet, config.max_len)

    init_ids = _letter_init_ids(source, alphabet) if config.init == "letters" else None
    program = R2DLProgram(source.word_embeddings, len(alphabet) + 1, None if config.dense else config.k,
                          source.cls_token_id, source.sep_token_id, init_ids, config.seed)
    n_source = _n_source_classes(source)
    n_target = len(task.classes)
    program.to(source.word_embeddings.device)
    provisional = R2DLModel(program, source, one_to_one(n_target, n_source))
    mapping = _build_mapping(config, n_target, n_source, (provisional, tr_ids, tr_mask, train.labels))
    model = R2DLModel(program, source, mapping.to(source.word_embeddings.device))

    history = train_r2dl(model, tr_ids, tr_mask, train.labels, epochs=config.epochs, batch_size=config.batch_size,
                         lr=config.lr, omp_every=config.omp_every, seed=config.seed, progress=progress, amp=amp)
    metrics = evaluate_r2dl(model, te_ids, te_mask, test.labels, amp=amp)
    task_info = {"name": task.name, "classes": list(task.classes), "source": task.source,
                 "n_train": len(train), "n_test": len(test), "alphabet": alphabet, "max_len": config.max_len}
    return R2DLResult(model, metrics, history, config, spec, task_info, time.time() - t0,
                      {"mapping": mapping.to_dict(), "device": str(source.word_embeddings.device), "amp": amp_name(amp)})


# --------------------------------------------------------------------------------------------
# Saving and loading
# --------------------------------------------------------------------------------------------
def save_r2dl(result: R2DLResult, path: str | os.PathLike) -> dict:
    """Write Θ (k-sparse: ``theta_indices``/``theta_values`` (T, k); dense: ``theta`` (T, |V_S|)),
    with a JSON manifest (format, source spec, k, mapping, task, config, metrics) as one
    ``.safetensors`` file, atomically. Returns the manifest."""
    from safetensors.torch import save_file

    path = check_output_path(path, suffix=".safetensors", what="R2DL result")
    program = result.model.program
    if program.k is None:
        tensors = {"theta": program.theta.detach().contiguous().clone()}
    else:
        idx, val = program.sparse_rows()
        tensors = {"theta_indices": idx.contiguous(), "theta_values": val.contiguous()}
    manifest = {"format": FORMAT, **result.summary(), "source_spec": result.source,
                "n_source_tokens": int(program.theta.shape[1]), "cls_id": program.cls_id, "sep_id": program.sep_id}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={MANIFEST_KEY: strict_dumps(manifest)})
    return manifest


def load_r2dl(path: str | os.PathLike, data_root: str | None = None, *, trust_code: bool = False) -> R2DLModel:
    """Rebuild the :class:`R2DLModel` saved by :func:`save_r2dl` (the source is rebuilt from its
    recorded spec, with the random encoder of a control run); ``model.manifest`` holds the record.
    The recorded source spec is the file's word: it resolves through our registries only, unless
    ``trust_code=True`` (see :mod:`robust_surgery.io.archspec`)."""
    from robust_surgery.io.archspec import reading_file
    from robust_surgery.io.checkpoint import read_checkpoint
    from robust_surgery.io.model_file import ModelLoadError, read_manifest

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"R2DL result {path} not found")
    manifest = read_manifest(path)
    if not manifest or manifest.get("format") != FORMAT:
        raise InvalidInputError(f"{path} is not an R2DL result (no '{FORMAT}' manifest); write one with "
                         "`surgery reprogram r2dl ... -o FILE`")
    try:
        cfg = manifest["config"]
        spec, random_enc, seed = manifest["source_spec"], bool(cfg["random_encoder"]), int(cfg["seed"])
        n_tokens = len(manifest["task"]["alphabet"]) + 1
        k = None if cfg["dense"] else int(cfg["k"])
        cls_id, sep_id, mapping = int(manifest["cls_id"]), int(manifest["sep_id"]), manifest["mapping"]
        if not isinstance(spec, str):
            raise InvalidTypeError("source_spec is not a string")
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{path}: the R2DL manifest is damaged ({type(e).__name__}: {e}); re-create the file "
                             "with `surgery reprogram r2dl ... -o FILE`") from None
    with reading_file(trust_code, path):
        source = load_sequence_source(spec, random_enc, seed, data_root, trust_code=trust_code)
    tensors = read_checkpoint(path)
    program = R2DLProgram(source.word_embeddings, n_tokens, k, cls_id, sep_id, init_ids=[0] * n_tokens)
    with torch.no_grad():
        if "theta" in tensors:
            program.theta.copy_(tensors["theta"])
        else:
            program.theta.copy_(sparse_to_dense(tensors["theta_indices"], tensors["theta_values"],
                                                program.theta.shape[1]))
    model = R2DLModel(program, source, LabelMapping.from_dict(mapping)).eval()
    model.manifest = manifest
    return model
