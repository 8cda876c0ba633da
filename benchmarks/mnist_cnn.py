"""Issue 30, MNIST at the standard budget: TRADES's SmallCNN trained clean and adversarially (resumable).

Rows (one process each, one thread): ``clean`` (Adam 1e-3, batch 128, 3 epochs) and ``at`` (from
scratch: PGD-10 at ε = 0.3, step 2.5·ε/10, random start, ε ramped linearly over the first third of
the steps, Adam 1e-3 with a cosine schedule, batch 128, 6 epochs, adversarial batches alone). Each
saves OUT/<row>.safetensors and OUT/<row>.train.json; checkpoints every 50 steps in OUT/ckpt-<row>/.

    python benchmarks/mnist_cnn.py --row at --out benchmarks/results/mnist-cnn
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import robust_surgery as rs
from robust_surgery.model_zoo.mnist_cnn import SmallCNN
from robust_surgery.nn.backends import c as cpu_kernels

ROWS = {
    "clean": dict(adversarial=None, epochs=3, lr=1e-3, batch_size=128),
    "at": dict(adversarial="pgd", eps=0.3, pgd_steps=10, ramp=1 / 3, epochs=6, lr=1e-3, schedule="cosine",
               batch_size=128),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--row", choices=list(ROWS), required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = SmallCNN()
    t = time.time()
    model, history = rs.pretrain(model, "mnist", **ROWS[args.row], seed=0, val_n=1000, progress=True,
                                 checkpoint_dir=args.out / f"ckpt-{args.row}", checkpoint_every=50)
    from robust_surgery._loops import evaluate_accuracy
    from robust_surgery.data.datasets import load_dataset

    x, y = load_dataset("mnist", "test").tensors
    correct, n = evaluate_accuracy(model.eval(), x, y)
    rs.save(model, args.out / f"{args.row}.safetensors", arch="robust_surgery.model_zoo.mnist_cnn:SmallCNN")
    info = {"row": args.row, "settings": ROWS[args.row], "test_acc": 100.0 * correct / n, "history": history,
            "train_wall_s": round(sum(h["seconds"] for h in history), 1), "wall_s_this_run": round(time.time() - t, 1),
            "cpu": cpu_kernels.cpu_features(), "threads": torch.get_num_threads(), "torch": torch.__version__}
    (args.out / f"{args.row}.train.json").write_text(json.dumps(info, indent=1))
    print(json.dumps({k: info[k] for k in ("row", "test_acc", "train_wall_s")}))


if __name__ == "__main__":
    main()
