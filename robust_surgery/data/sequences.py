"""Sequence data sets: peptide tasks (FASTA) for R2DL and the UCI sentiment sentences.

Files are looked up in the data roots of :func:`robust_surgery.data.datasets.resolve_data_root` (the
``data_root`` argument, ``$ROBUST_SURGERY_DATA``, the user cache); a missing file is a
:class:`~robust_surgery.data.datasets.DataNotFoundError` listing where we looked. Splits are fixed, seeded
and stratified (:func:`stratified_split`), so every run of a task sees the same test points.

Built-in peptide tasks (``load_peptide_task``): ``amp`` (antimicrobial 1 vs length-matched
non-antimicrobial 0, the label is the file), ``toxicity`` (ToxinPred main set, Swiss-Prot
negatives; 1 = toxic), ``toxicity-trembl`` and ``hemolysis`` (same layout). A folder with
``seqs.fasta`` + ``classes.txt``, or a ``sequence<TAB>label`` text file, is a custom task.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from robust_surgery.data.datasets import DataFormatError, find_data_file
from robust_surgery.errors import InvalidInputError, MissingFileError

__all__ = [
    "AMINO_ACIDS",
    "PEPTIDE_TASKS",
    "PeptideTask",
    "composition_features",
    "physicochemical_features",
    "encode_sequences",
    "load_peptide_task",
    "load_uci_sentiment",
    "pad_token_rows",
    "read_fasta",
    "stratified_split",
]

# The 20 standard amino acids; any other letter (X, B, Z, U, O) maps to one "other" token.
AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"

PEPTIDE_TASKS: dict[str, dict] = {
    "amp": {"files": {1: "peptides/amp/M_model_train_AMP_sequence.numbered.fasta",
                      0: "peptides/amp/M_model_train_nonAMP_sequence.numbered.proplen.subsample.fasta"},
            "classes": ("non-AMP", "AMP")},
    "toxicity": {"folder": "peptides/toxicity-swissprot", "classes": ("non-toxic", "toxic")},
    "toxicity-trembl": {"folder": "peptides/toxicity-trembl", "classes": ("non-toxic", "toxic")},
    "hemolysis": {"folder": "peptides/hemolysis", "classes": ("non-hemolytic", "hemolytic")},
}
UCI_SENTIMENT_FILES = ("amazon_cells_labelled.txt", "imdb_labelled.txt", "yelp_labelled.txt")


@dataclass(frozen=True)
class PeptideTask:
    """A binary (or K-class) sequence task: ``sequences[i]`` (upper-case letters) has ``labels[i]``."""

    name: str
    sequences: tuple[str, ...]
    labels: torch.Tensor  # (N,) int64
    classes: tuple[str, ...]
    source: str

    def __len__(self) -> int:
        return len(self.sequences)

    def subset(self, index) -> "PeptideTask":
        """The task restricted to the points ``index`` (a sequence of ints or a LongTensor)."""
        idx = torch.as_tensor(index, dtype=torch.long)
        return PeptideTask(self.name, tuple(self.sequences[i] for i in idx.tolist()), self.labels[idx],
                           self.classes, self.source)


def read_fasta(path: str | os.PathLike) -> list[tuple[str, str]]:
    """``[(header, sequence), ...]`` of a FASTA file; multi-line sequences are joined, upper-cased.

    Headers may be empty (``>`` alone). DataFormatError when the file holds no record or a
    sequence line comes before the first header.
    """
    path = Path(path)
    records: list[tuple[str, list[str]]] = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if line.startswith(">"):
            records.append((line[1:].strip(), []))
        elif not records:
            raise DataFormatError(f"{path}:{n}: sequence data before the first '>' header; is this a FASTA file?")
        else:
            records[-1][1].append(line.upper())
    if not records:
        raise DataFormatError(f"{path}: no FASTA records ('>' header lines) found")
    out = [(h, "".join(parts)) for h, parts in records]
    empty = [i for i, (_, s) in enumerate(out) if not s]
    if empty:
        raise DataFormatError(f"{path}: record {empty[0] + 1} has an empty sequence")
    return out


def _read_labels(path: Path, n: int) -> list[int]:
    values = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    try:
        labels = [int(v) for v in values]
    except ValueError:
        raise DataFormatError(f"{path}: class labels must be integers, one per line") from None
    if len(labels) != n:
        raise DataFormatError(f"{path} has {len(labels)} labels but the FASTA file has {n} sequences")
    return labels


def _load_folder_task(folder: Path, name: str, classes: tuple[str, ...] | None) -> PeptideTask:
    seqs = [s for _, s in read_fasta(folder / "seqs.fasta")]
    labels = _read_labels(folder / "classes.txt", len(seqs))
    return _task(name, seqs, labels, classes, str(folder))


def _task(name: str, seqs, labels, classes, source: str) -> PeptideTask:
    y = torch.tensor(labels, dtype=torch.long)
    if y.min() < 0:
        raise DataFormatError(f"{source}: labels must be 0..K-1, got {int(y.min())}")
    k = int(y.max()) + 1
    if k < 2:
        raise DataFormatError(f"{source}: a task needs at least two classes, all labels are {int(y.max())}")
    classes = tuple(classes) if classes else tuple(str(i) for i in range(k))
    return PeptideTask(name, tuple(seqs), y, classes, source)


def load_peptide_task(spec: str | os.PathLike, data_root: str | os.PathLike | None = None) -> PeptideTask:
    """Load a peptide task: a built-in name (see :data:`PEPTIDE_TASKS`) or a path.

    A path is a folder with ``seqs.fasta`` and a line-aligned ``classes.txt`` (integer labels),
    or a text file of ``sequence<TAB>label`` lines. Built-in files are found through the data
    roots (DataNotFoundError lists where we looked).
    """
    key = str(spec).strip().lower()
    if key in PEPTIDE_TASKS:
        info = PEPTIDE_TASKS[key]
        if "files" in info:
            seqs, labels, sources = [], [], []
            for label, rel in sorted(info["files"].items()):
                path = find_data_file(rel, data_root)
                recs = read_fasta(path)
                seqs += [s for _, s in recs]
                labels += [label] * len(recs)
                sources.append(str(path))
            return _task(key, seqs, labels, info["classes"], " + ".join(sources))
        path = find_data_file(f"{info['folder']}/seqs.fasta", data_root)
        find_data_file(f"{info['folder']}/classes.txt", data_root)
        return _load_folder_task(path.parent, key, info["classes"])
    path = Path(spec).expanduser()
    if path.is_dir():
        missing = [f for f in ("seqs.fasta", "classes.txt") if not (path / f).is_file()]
        if missing:
            raise MissingFileError(f"{path}: a task folder needs seqs.fasta and classes.txt; missing {', '.join(missing)}")
        return _load_folder_task(path, path.name, None)
    if path.is_file():
        seqs, labels = [], []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.strip().split("\t")
            if len(parts) != 2 or not parts[1].strip().lstrip("-").isdigit():
                raise DataFormatError(f"{path}:{n}: expected 'sequence<TAB>integer label'")
            seqs.append(parts[0].strip().upper())
            labels.append(int(parts[1]))
        if not seqs:
            raise DataFormatError(f"{path}: no 'sequence<TAB>label' lines")
        return _task(path.stem, seqs, labels, None, str(path))
    raise InvalidInputError(f"unknown peptide task {str(spec)!r}: use one of {', '.join(PEPTIDE_TASKS)}, a folder with "
                     "seqs.fasta and classes.txt, or a 'sequence<TAB>label' file")


def load_uci_sentiment(data_root: str | os.PathLike | None = None) -> tuple[list[str], torch.Tensor]:
    """The 2990 UCI Sentiment Labelled Sentences (Amazon, IMDb, Yelp, in that order): ``(sentences,
    labels (N,) int64, 1 = positive)``. Lines are ``sentence<TAB>label``; surrounding quotes and
    blanks are kept as in the file (the tokenizer ignores them)."""
    sentences, labels = [], []
    for name in UCI_SENTIMENT_FILES:
        path = find_data_file(f"text/uci-sentiment/{name}", data_root)
        raw = path.read_bytes()
        try:
            content = raw.decode("utf-8")
        except UnicodeDecodeError:  # some of the UCI files are Latin-1 (e.g. 'café' as byte 0xe9)
            content = raw.decode("latin-1")
        for n, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                continue
            text, sep, label = line.rstrip("\r").rpartition("\t")
            if not sep or label.strip() not in ("0", "1"):
                raise DataFormatError(f"{path}:{n}: expected 'sentence<TAB>0|1'")
            sentences.append(text)
            labels.append(int(label))
    return sentences, torch.tensor(labels, dtype=torch.long)


def stratified_split(labels: torch.Tensor, test_fraction: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed, seeded, stratified ``(train_idx, test_idx)`` (sorted LongTensors) of ``labels`` (N,).

    Each class contributes ``round(test_fraction * n_class)`` test points, drawn by a permutation
    from ``numpy.random.default_rng(seed)``, so a split depends only on the labels and the seed.
    """
    if not 0.0 < test_fraction < 1.0:
        raise InvalidInputError(f"test_fraction must be in (0, 1), got {test_fraction}")
    y = np.asarray(torch.as_tensor(labels))
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        take = int(round(test_fraction * len(idx)))
        test.extend(rng.permutation(idx)[:take].tolist())
    mask = np.zeros(len(y), dtype=bool)
    mask[test] = True
    return torch.from_numpy(np.flatnonzero(~mask)), torch.from_numpy(np.flatnonzero(mask))


def encode_sequences(sequences, alphabet: str = AMINO_ACIDS, max_len: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``(N, L)`` int64 and mask ``(N, L)`` of sequences over ``alphabet``.

    Letter ``alphabet[i]`` -> id ``i``; any other letter -> ``len(alphabet)`` ("other"); positions
    past a sequence's end are padding (id 0, mask 0). Sequences longer than ``max_len`` are cut to
    their first ``max_len`` letters; ``L`` is the longest kept length.
    """
    if max_len < 1:
        raise InvalidInputError(f"max_len must be >= 1, got {max_len}")
    index = {ch: i for i, ch in enumerate(alphabet)}
    other = len(alphabet)
    rows = [[index.get(ch, other) for ch in s.upper()[:max_len]] for s in sequences]
    if not rows or min(len(r) for r in rows) == 0:
        raise InvalidInputError("encode_sequences needs at least one sequence and no empty ones")
    return pad_token_rows(rows)


def pad_token_rows(rows: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad lists of token ids to the longest: ``(ids (N, L) int64, mask (N, L) int64)``,
    mask 1 on real tokens, 0 on padding (id ``pad_id``)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask


def composition_features(sequences, dipeptides: bool = False, alphabet: str = AMINO_ACIDS) -> np.ndarray:
    """Amino-acid composition ``(N, A)`` (fraction of each letter of ``alphabet``), followed with
    ``dipeptides`` by the dipeptide composition ``(N, A*A)`` (fraction of each ordered pair of
    neighbours); float64. Letters outside the alphabet count in the length but in no column."""
    a = len(alphabet)
    index = {ch: i for i, ch in enumerate(alphabet)}
    out = np.zeros((len(sequences), a + (a * a if dipeptides else 0)))
    for row, seq in enumerate(sequences):
        ids = [index.get(ch, -1) for ch in seq.upper()]
        for i in ids:
            if i >= 0:
                out[row, i] += 1.0
        out[row, :a] /= max(len(ids), 1)
        if dipeptides and len(ids) > 1:
            for i, j in zip(ids, ids[1:]):
                if i >= 0 and j >= 0:
                    out[row, a + i * a + j] += 1.0
            out[row, a:] /= len(ids) - 1
    return out


# Per-residue scales (published constants): Kyte & Doolittle 1982 hydropathy, Eisenberg 1984
# consensus hydrophobicity (for the helical hydrophobic moment), charge at pH 7.
_KYTE_DOOLITTLE = dict(zip(AMINO_ACIDS, (1.8, 2.5, -3.5, -3.5, 2.8, -0.4, -3.2, 4.5, -3.9, 3.8, 1.9, -3.5, -1.6,
                                         -3.5, -4.5, -0.8, -0.7, 4.2, -0.9, -1.3)))
_EISENBERG = dict(zip(AMINO_ACIDS, (0.62, 0.29, -0.90, -0.74, 1.19, 0.48, -0.40, 1.38, -1.50, 1.06, 0.64, -0.78,
                                    0.12, -0.85, -2.53, -0.18, -0.05, 1.08, 0.81, 0.26)))
_CHARGE = {"K": 1.0, "R": 1.0, "H": 0.1, "D": -1.0, "E": -1.0}
PHYSICOCHEMICAL_NAMES = ("length", "log_length", "net_charge", "charge_density", "hydropathy",
                         "hydrophobic_moment", "aromatic_fraction", "hydrophobic_fraction")


def physicochemical_features(sequences) -> np.ndarray:
    """Global peptide descriptors ``(N, 8)``, float64, in the order of ``PHYSICOCHEMICAL_NAMES``:
    length (residues) and its log, net charge at pH 7 (K, R +1; H +0.1; D, E −1) and charge per
    residue, mean Kyte–Doolittle hydropathy, the helical hydrophobic moment
    |Σ h_i e^{i·100°·i}| / n on the Eisenberg scale (amphipathic helices: high in many
    antimicrobial peptides), the aromatic (F, W, Y) and hydrophobic (A, I, L, M, F, V, W) fractions.
    Letters outside the 20 amino acids count in the length and in no scale."""
    out = np.zeros((len(sequences), len(PHYSICOCHEMICAL_NAMES)))
    angle = np.deg2rad(100.0)
    for row, seq in enumerate(sequences):
        seq = seq.upper()
        n = max(len(seq), 1)
        h = np.array([_EISENBERG.get(ch, 0.0) for ch in seq])
        k = np.arange(len(seq)) * angle
        moment = float(np.hypot((h * np.cos(k)).sum(), (h * np.sin(k)).sum())) / n
        charge = sum(_CHARGE.get(ch, 0.0) for ch in seq)
        out[row] = (len(seq), np.log1p(len(seq)), charge, charge / n,
                    sum(_KYTE_DOOLITTLE.get(ch, 0.0) for ch in seq) / n, moment,
                    sum(ch in "FWY" for ch in seq) / n, sum(ch in "AILMFVW" for ch in seq) / n)
    return out
