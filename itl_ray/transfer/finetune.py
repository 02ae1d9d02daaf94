"""Fine-tuning a pretrained AlexNet as a classifier: the loop shared by the action and scene tasks.

The study fine-tuned every layer. Defaults follow the common recipe of that time: a new fc8,
learning rate 0.001 for the pretrained layers and ten times that for fc8, momentum 0.9, weight
decay 5e-4.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Annotated, Callable

import torch
import torch.nn.functional as F
from itl_ray.bounds import Ge, Gt, Interval

from itl_ray.images import center_crops, normalize, random_crops
from itl_ray.models import AlexNet


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning settings shared by the action and scene stages. **Assumption** (the study does not
    give them): the common recipe of its time, as in the module docstring; ``lr`` applies to the
    pretrained layers, 10x to the new fc8, divided by 10 every ``lr_drop_every`` epochs."""

    epochs: Annotated[int, Ge(1)] = 30
    batch_size: Annotated[int, Ge(1)] = 64  # images per SGD step
    lr: Annotated[float, Gt(0)] = 0.001  # pretrained layers; the new fc8 uses 10x
    lr_drop_every: Annotated[int, Ge(1)] = 20  # epochs; divided by 10
    momentum: Annotated[float, Interval(ge=0, lt=1)] = 0.9
    weight_decay: Annotated[float, Ge(0)] = 5e-4


def finetune(
    backbone: AlexNet,
    images: torch.Tensor,
    targets: torch.Tensor,
    num_outputs: int,
    config: FinetuneConfig,
    device: torch.device,
    seed: int,
    multi_label: bool = False,
    log: Callable[[str], None] = print,
    task: str = "finetune",
    curve: Callable[[dict[str, float], int], None] | None = None,
) -> AlexNet:
    """A copy of ``backbone`` with a new ``num_outputs``-way fc8, trained on uint8 images (NxCxSxS,
    S >= the model's resolution; random crops + flips). ``targets``: class indices, or multi-hot
    floats when ``multi_label``. After each epoch ``curve`` (when given) gets ``<task>/loss`` (the
    epoch's mean loss) and ``<task>/lr`` (the pretrained layers' rate; fc8's is 10x) at step = epoch."""
    model = copy.deepcopy(backbone)
    model.replace_classifier(num_outputs)
    model.to(device)
    head = list(model.fc8.parameters())
    head_ids = {id(p) for p in head}
    body = [p for p in model.parameters() if id(p) not in head_ids]
    optimizer = torch.optim.SGD(
        [{"params": body, "lr": config.lr}, {"params": head, "lr": 10 * config.lr}],
        momentum=config.momentum, weight_decay=config.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.lr_drop_every, gamma=0.1)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(1, config.epochs + 1):
        model.train()
        order = torch.randperm(len(images), generator=generator)
        total, steps = 0.0, 0
        for start in range(0, len(images), config.batch_size):
            index = order[start : start + config.batch_size]
            batch = random_crops(images[index], model.resolution, generator)
            logits = model(normalize(batch.to(device)))
            target = targets[index].to(device)
            if multi_label:
                loss = F.binary_cross_entropy_with_logits(logits, target)
            else:
                loss = F.cross_entropy(logits, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item()
            steps += 1
        if curve is not None:
            curve({f"{task}/loss": total / max(1, steps), f"{task}/lr": optimizer.param_groups[0]["lr"]}, epoch)
        scheduler.step()
        if epoch == config.epochs or epoch % 10 == 0:
            log(f"{task}: epoch {epoch}/{config.epochs} loss {total / max(1, steps):.3f}")
    return model


@torch.no_grad()
def predict(model: AlexNet, images: torch.Tensor, device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """Logits for center crops of uint8 images."""
    model.eval()
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = center_crops(images[start : start + batch_size], model.resolution)
        outputs.append(model(normalize(batch.to(device))).float().cpu())
    return torch.cat(outputs) if outputs else torch.empty(0)
