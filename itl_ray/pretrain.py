"""Pretraining AlexNet on an ImageNet subset: plain SGD loop, a checkpoint every epoch, resumable.

Defaults follow Caffe's reference AlexNet recipe, which the study used (the exact schedule for
the smaller subsets is not given in its text, so it is an assumption here): SGD with momentum 0.9,
weight decay 5e-4, batch 256, learning rate 0.01 divided by 10 every 30 epochs, 90 epochs, random
crops and flips. The number of epochs is the same for every subset size (smaller subsets get fewer
iterations).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from itl_ray import loader
from itl_ray.errors import UserError
from itl_ray.models import AlexNet


@dataclass(frozen=True)
class PretrainConfig:
    num_classes: int | None = None  # ImageNet classes drawn (nested, seeded); null: all of them
    images_per_class: int = 1300  # per class (nested, seeded); 0: no pretraining, random init
    label_set: str = "fine"  # fine, or a WordNet label set that merges classes (see wordnet.py)
    shortfall: str = "take_all"  # a class with fewer images: take_all (recorded) or error
    epochs: int = 90
    batch_size: int = 256  # images per SGD step
    lr: float = 0.01  # at batch_size; divided by 10 every lr_drop_every epochs
    lr_drop_every: int = 30  # epochs
    momentum: float = 0.9
    weight_decay: float = 5e-4

    def validate(self, path: str) -> None:
        prefix = f"{path}." if path else ""
        if self.images_per_class < 0:
            raise UserError(f"{prefix}images_per_class must be >= 0 (0 means no pretraining)")
        if self.num_classes is not None and self.num_classes < 1:
            raise UserError(f"{prefix}num_classes must be >= 1 or null (all classes)")
        if self.shortfall not in ("take_all", "error"):
            raise UserError(f"{prefix}shortfall must be take_all or error, got {self.shortfall!r}")
        for key in ("epochs", "batch_size", "lr_drop_every"):
            if getattr(self, key) < 1:
                raise UserError(f"{prefix}{key} must be >= 1")


def resize_for(resolution: int) -> int:
    """Stored short side for random crops of ``resolution`` (256 for 224: ImageNet's usual ratio)."""
    return round(resolution * 256 / 224)


def save_atomically(state: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


@torch.no_grad()
def top1(model: AlexNet, images: torch.Tensor, labels: torch.Tensor, device: torch.device, batch_size: int = 256) -> float:
    """Top-1 accuracy (fraction) on center crops at the model's resolution."""
    model.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        batch = loader.center_crops(images[start : start + batch_size], model.resolution)
        logits = model(loader.normalize(batch.to(device)))
        correct += (logits.argmax(1).cpu() == labels[start : start + batch_size]).sum().item()
    return correct / max(1, len(images))


def pretrain(
    model: AlexNet,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    val_images: torch.Tensor,
    val_labels: torch.Tensor,
    config: PretrainConfig,
    device: torch.device,
    seed: int,
    checkpoint: Path,
    on_epoch: Callable[[int, dict], None] = lambda epoch, metrics: None,
    log: Callable[[str], None] = print,
) -> dict:
    """Train ``model`` in place; resumes from ``checkpoint`` when it exists. Returns final metrics
    (``pretrain_top1`` in percent on the validation images of the trained classes)."""
    model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.lr_drop_every, gamma=0.1)
    generator = torch.Generator().manual_seed(seed)
    start_epoch = 1
    if checkpoint.is_file():
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        start_epoch = state["epoch"] + 1
        log(f"pretrain: resumed after epoch {state['epoch']}")
    count = len(train_images)
    accuracy = None
    for epoch in range(start_epoch, config.epochs + 1):
        model.train()
        order = torch.randperm(count, generator=generator)
        total_loss, steps = 0.0, 0
        for start in range(0, count, config.batch_size):
            index = order[start : start + config.batch_size]
            batch = loader.random_crops(train_images[index], model.resolution, generator)
            logits = model(loader.normalize(batch.to(device)))
            loss = F.cross_entropy(logits, train_labels[index].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.item()
            steps += 1
        scheduler.step()
        accuracy = top1(model, val_images, val_labels, device)
        metrics = {"pretrain_loss": total_loss / max(1, steps), "pretrain_val_top1": 100 * accuracy}
        save_atomically(
            {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "generator": generator.get_state(), "epoch": epoch},
            checkpoint,
        )
        log(f"pretrain: epoch {epoch}/{config.epochs} loss {metrics['pretrain_loss']:.3f} "
            f"val top-1 {metrics['pretrain_val_top1']:.1f}%")
        on_epoch(epoch, metrics)
    if accuracy is None:  # every epoch was done before this call
        accuracy = top1(model, val_images, val_labels, device)
    return {"pretrain_top1": 100 * accuracy}
