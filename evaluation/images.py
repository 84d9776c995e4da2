"""Images for vision models: calibration samples and top-1 accuracy on an image-classification
folder in the ImageNet layout (one sub-folder per class), preprocessed by timm's own evaluation
transform for the model (``resolve_data_config`` / ``create_transform``)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pluggy
import torch
from torch import Tensor, nn

from ..core.dataset import ImageDataset, Purpose, resolve_data_dir
from ..core.errors import DataNotFoundError
from ..core.plugin_manager import registry_for
from ..core.progress import progress
from .datasets import dataset


@dataclass(frozen=True)
class AccuracyResult:
    folder: str
    top1: float
    images: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def image_source(source: str | Path, purpose: Purpose, *, data_dir: str | Path | None = None,
                 plugin_manager: pluggy.PluginManager | None = None) -> Sequence[tuple[Any, int]]:
    """(image, label) pairs from an image folder path (one sub-folder per class) or a registered
    image dataset's split for ``purpose``."""
    from torchvision.datasets import ImageFolder

    folder = Path(source).expanduser()
    if folder.is_dir():
        return ImageFolder(str(folder))
    if str(source) in registry_for(plugin_manager).table("dataset"):
        found: ImageDataset = dataset(str(source), "images", plugin_manager)
        return found.images(purpose, resolve_data_dir(data_dir))
    raise DataNotFoundError(f"image folder {folder} does not exist and no image dataset is registered as {source!r}; "
                            "give a folder with one sub-folder per class, or a registered image dataset")


class Preprocessed(torch.utils.data.Dataset):
    """Images as ``model`` sees them: timm's evaluation transform for the model, in the channel
    mode it takes."""

    def __init__(self, samples: Sequence[tuple[Any, int]], model: nn.Module) -> None:
        import timm.data

        config = timm.data.resolve_data_config({}, model=model)
        self.samples, self.transform = samples, timm.data.create_transform(**config)
        self.mode = "L" if config["input_size"][0] == 1 else "RGB"

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image, label = self.samples[index]
        return self.transform(image.convert(self.mode)), label


def calibration_images(model: nn.Module, source: str | Path, *, nsamples: int, seed: int,
                       data_dir: str | Path | None = None, plugin_manager: pluggy.PluginManager | None = None) -> Tensor:
    """``nsamples`` images drawn at random (seeded) from ``source``, preprocessed: (N, C, H, W)."""
    images = Preprocessed(image_source(source, "calibration", data_dir=data_dir, plugin_manager=plugin_manager), model)
    if nsamples > len(images):
        raise ValueError(f"{source} holds {len(images)} images, fewer than the {nsamples} calibration samples asked for")
    picks = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:nsamples]
    return torch.stack([images[i][0] for i in picks.tolist()])


def top1_accuracy(
    model: nn.Module,
    folder: str | Path,
    *,
    batch_size: int = 256,
    limit: int | None = None,
    device: str | torch.device | None = None,
) -> AccuracyResult:
    """Top-1 accuracy of ``model`` on ``folder`` (an image folder, or a registered image dataset's
    evaluation split; at most ``limit`` images, in order)."""
    images: torch.utils.data.Dataset = Preprocessed(image_source(folder, "evaluation"), model)
    if limit is not None:
        images = torch.utils.data.Subset(images, range(min(limit, len(images))))
    loader = torch.utils.data.DataLoader(images, batch_size=batch_size, shuffle=False)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    correct = seen = 0
    model.eval()
    with torch.inference_mode():
        for batch, labels in progress(loader, desc=f"top-1 {Path(folder).name}", total=math.ceil(len(images) / batch_size)):
            logits = model(batch.to(device))
            correct += int((logits.argmax(dim=1).cpu() == labels).sum())
            seen += labels.numel()
    return AccuracyResult(str(folder), correct / seen, seen)
