"""Images for vision models: calibration samples and top-1 accuracy on an image-classification
folder in the ImageNet layout (one sub-folder per class), preprocessed by timm's own evaluation
transform for the model (``resolve_data_config`` / ``create_transform``)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..core.errors import DataNotFoundError
from ..core.progress import progress


@dataclass(frozen=True)
class AccuracyResult:
    folder: str
    top1: float
    images: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def image_folder(folder: str | Path, model: nn.Module):
    """A torchvision ImageFolder read with ``model``'s timm evaluation transform."""
    import timm.data
    from PIL import Image
    from torchvision.datasets import ImageFolder

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataNotFoundError(f"image folder {folder} does not exist; give a folder with one sub-folder per class")
    config = timm.data.resolve_data_config({}, model=model)
    mode = "L" if config["input_size"][0] == 1 else "RGB"
    return ImageFolder(str(folder), transform=timm.data.create_transform(**config), loader=lambda p: Image.open(p).convert(mode))


def calibration_images(model: nn.Module, folder: str | Path, *, nsamples: int, seed: int) -> Tensor:
    """``nsamples`` images drawn at random (seeded) from ``folder``, preprocessed: (N, C, H, W)."""
    dataset = image_folder(folder, model)
    if nsamples > len(dataset):
        raise ValueError(f"{folder} holds {len(dataset)} images, fewer than the {nsamples} calibration samples asked for")
    picks = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:nsamples]
    return torch.stack([dataset[i][0] for i in picks.tolist()])


def top1_accuracy(
    model: nn.Module,
    folder: str | Path,
    *,
    batch_size: int = 256,
    limit: int | None = None,
    device: str | torch.device | None = None,
) -> AccuracyResult:
    """Top-1 accuracy of ``model`` on ``folder`` (at most ``limit`` images, in folder order)."""
    dataset = image_folder(folder, model)
    if limit is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(limit, len(dataset))))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    correct = seen = 0
    model.eval()
    with torch.inference_mode():
        for images, labels in progress(loader, desc=f"top-1 {Path(folder).name}", total=math.ceil(len(dataset) / batch_size)):
            logits = model(images.to(device))
            correct += int((logits.argmax(dim=1).cpu() == labels).sum())
            seen += labels.numel()
    return AccuracyResult(str(folder), correct / seen, seen)
