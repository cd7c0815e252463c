"""Train the demo's Fashion-MNIST feature network on the CPU and package it with ctok.

    python scripts/train_fmnist_classifier.py            # writes src/ctok/assets/fmnist_classifier.*

Trains on the 60k training images, measures accuracy on the 10k test images, and writes the
weights (safetensors) and a record (JSON: test accuracy, command, seed, epochs, date, sha256).
Deterministic for a given seed, thread count and torch build.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from ctok.data.fashion_mnist import load_fashion_mnist_raw, to_model_images
from ctok.models.fmnist_classifier import RECORD_NAME, WEIGHTS_NAME, FashionMNISTClassifier

ASSETS = Path(__file__).resolve().parents[1] / "src" / "ctok" / "assets"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data",
                   help="folder with the Fashion-MNIST IDX files (default: searched, see ctok.data.fashion_mnist)")
    p.add_argument("--out", type=Path, default=ASSETS, help="folder for the weights and the record")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate (1 epoch warm-up, cosine decay)")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (results depend on the count; 1 reproduces anywhere)")
    return p.parse_args(argv)


@torch.no_grad()
def accuracy(model: torch.nn.Module, raw: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(raw), batch_size):
        logits = model(to_model_images(raw[i : i + batch_size]))["logits"]
        correct += int((logits.argmax(1) == labels[i : i + batch_size]).sum())
    return correct / len(raw)


def train(args: argparse.Namespace) -> tuple[FashionMNISTClassifier, float]:
    raw, labels = load_fashion_mnist_raw("train", args.data)
    generator = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)  # the weights' initialisation
    model = FashionMNISTClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(raw) / args.batch_size)
    total = args.epochs * steps_per_epoch
    warmup = steps_per_epoch

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(raw), generator=generator)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", unit="batch")
        for step in bar:
            index = order[step * args.batch_size : (step + 1) * args.batch_size]
            x = to_model_images(raw[index])
            # Left-right flips are the one augmentation that keeps every class a valid garment.
            flip = torch.rand(len(x), generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss = F.cross_entropy(model(x)["logits"], labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
    return model, time.time() - start


def write_atomically(path: Path, write) -> None:
    """Call ``write(temp_path)`` on a sibling file, then move it over ``path`` in one step."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(str(temp))
        os.chmod(temp, 0o644)  # safetensors creates files private to their owner; assets are for everyone
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    model, seconds = train(args)
    test_raw, test_labels = load_fashion_mnist_raw("test", args.data)
    test_accuracy = accuracy(model, test_raw, test_labels)
    print(f"test accuracy {test_accuracy:.4f} after {args.epochs} epochs ({seconds:.0f} s)")

    args.out.mkdir(parents=True, exist_ok=True)
    weights = args.out / WEIGHTS_NAME
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    write_atomically(weights, lambda temp: save_file(state, temp, metadata={"format": "pt"}))
    record = {
        "test_accuracy": test_accuracy,
        "test_images": len(test_raw),
        "epochs": args.epochs,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "threads": args.threads,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(seconds, 1),
        "command": shlex.join(["python", *sys.argv]),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
    }
    text = json.dumps(record, indent=2) + "\n"
    write_atomically(args.out / RECORD_NAME, lambda temp: Path(temp).write_text(text))
    print(f"wrote {weights} and {args.out / RECORD_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
