"""Train a small DeiT (timm, with a distillation token) on MNIST digits on the CPU, save it in timm's
folder format, and write the digits as image folders, so that the ordinary commands take it from there:

    python examples/mnist_deit.py --data-dir ../shared/data --out runs/mnist
    compquant eval runs/mnist/deit --imagefolder runs/mnist/test
    compquant quantize runs/mnist/deit --solver gptq --bits 4 --group-size -1 \\
        --calib runs/mnist/train --nsamples 128 -o runs/mnist/deit-gptq-w4
    compquant eval runs/mnist/deit-gptq-w4 --imagefolder runs/mnist/test

Data: ``mnist/mnist_5k.csv.gz`` (5,000 training digits, 500 per class: training and calibration) and
the official 10,000-digit test set in IDX format (evaluation only). No teacher is available offline,
so both heads learn from the labels (the distillation head sees them as its "teacher").
"""
from __future__ import annotations

import argparse
import gzip
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

MEAN, STD = 0.1307, 0.3081


def read_training_digits(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    rows = np.loadtxt(gzip.open(data_dir / "mnist" / "mnist_5k.csv.gz", "rt"), delimiter=",", dtype=np.int64)
    return rows[:, :784].reshape(-1, 28, 28).astype(np.uint8), rows[:, 784]


def read_test_digits(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    images = np.frombuffer(gzip.open(data_dir / "mnist" / "t10k-images-idx3-ubyte.gz").read(), np.uint8, offset=16)
    labels = np.frombuffer(gzip.open(data_dir / "mnist" / "t10k-labels-idx1-ubyte.gz").read(), np.uint8, offset=8)
    return images.reshape(-1, 28, 28).copy(), labels.astype(np.int64)


def write_image_folder(images: np.ndarray, labels: np.ndarray, folder: Path) -> None:
    """One PNG per digit under folder/<label>/, written once (a complete folder is left alone)."""
    from PIL import Image

    if (folder / ".complete").exists():
        return
    for label in range(10):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
    for index, (image, label) in enumerate(zip(images, labels)):
        Image.fromarray(image, mode="L").save(folder / str(int(label)) / f"{index:05d}.png")
    (folder / ".complete").touch()


def build_model(seed: int):
    import timm

    torch.manual_seed(seed)
    overlay = dict(mean=(MEAN,), std=(STD,), input_size=(1, 28, 28), crop_pct=1.0, interpolation="bilinear")
    return timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=28, patch_size=7,
                             embed_dim=96, depth=6, num_heads=3, num_classes=10, in_chans=1,
                             pretrained_cfg_overlay=overlay)


def shifted(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 2 pixels, the only augmentation."""
    dx, dy = (torch.randint(-2, 3, (2,), generator=generator)).tolist()
    return torch.roll(batch, shifts=(dy, dx), dims=(2, 3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=Path("runs/mnist"))
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from timm.models import save_for_hf

    train_x, train_y = read_training_digits(args.data_dir)
    test_x, test_y = read_test_digits(args.data_dir)
    write_image_folder(train_x, train_y, args.out / "train")
    write_image_folder(test_x, test_y, args.out / "test")

    model = build_model(args.seed)
    model.set_distilled_training(True)
    inputs = (torch.from_numpy(train_x).float().unsqueeze(1) / 255 - MEAN) / STD
    labels = torch.from_numpy(train_y)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    steps = args.epochs * -(-len(inputs) // args.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(args.seed)
    started = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(inputs), generator=generator)
        total = 0.0
        for start in range(0, len(inputs), args.batch_size):
            pick = order[start : start + args.batch_size]
            head, distilled = model(shifted(inputs[pick], generator))
            loss = (F.cross_entropy(head, labels[pick], label_smoothing=0.1)
                    + F.cross_entropy(distilled, labels[pick], label_smoothing=0.1)) / 2
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(pick)
        print(f"epoch {epoch + 1}/{args.epochs}: loss {total / len(inputs):.4f} ({time.perf_counter() - started:.0f} s)", flush=True)
    model.set_distilled_training(False)
    model.eval()
    with torch.no_grad():
        test_inputs = (torch.from_numpy(test_x).float().unsqueeze(1) / 255 - MEAN) / STD
        predictions = torch.cat([model(batch).argmax(dim=1) for batch in test_inputs.split(500)])
    accuracy = (predictions.numpy() == test_y).mean()
    save_for_hf(model, args.out / "deit", safe_serialization=True)
    print(f"trained in {time.perf_counter() - started:.0f} s; test top-1 {100 * accuracy:.2f}%; saved to {args.out / 'deit'}")


if __name__ == "__main__":
    main()
