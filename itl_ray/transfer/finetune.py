"""Fine-tuning a pretrained AlexNet as a classifier: the loop shared by the action and scene tasks.

The study fine-tuned every layer with Caffe. Defaults follow Caffe's fine-tuning recipe of that
time (models/finetune_flickr_style/train_val.prototxt and solver.prototxt): a new fc8 learning at
ten times the rate of the pretrained layers (``lr_mult: 10`` for its weights, ``20`` for its
bias), every other layer with the pretrained network's multipliers (weights 1, biases 2, biases
not decayed: ``models.parameter_groups``), base rate 0.001, momentum 0.9, weight decay 5e-4,
the rate divided by 10 at fixed steps.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Annotated, Callable

import torch
import torch.nn.functional as F
from itl_ray.bounds import Ge, Gt, Interval

from itl_ray.images import center_crops, normalize, random_crops
from itl_ray.models import AlexNet, parameter_groups

HEAD_LR_MULT = 10.0  # the new fc8's rate over the base rate (finetune_flickr_style: lr_mult 10, bias 20)


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning settings shared by the action and scene stages. **Assumption** (the study does not
    give them): Caffe's fine-tuning recipe of its time, as in the module docstring; ``lr`` applies to
    the pretrained layers' weights (biases twice that), ten times to the new fc8, divided by 10
    every ``lr_drop_every`` epochs."""

    # Passes over the training images; 0 keeps the pretrained layers as they are and trains nothing
    # (the new fc8 stays at its initialisation: for checks that skip fine-tuning).
    epochs: Annotated[int, Ge(0)] = 30
    batch_size: Annotated[int, Ge(1)] = 64  # images per SGD step
    lr: Annotated[float, Gt(0)] = 0.001  # pretrained layers' weights; biases 2x, the new fc8 10x (its bias 20x)
    lr_drop_every: Annotated[int, Ge(1)] = 20  # epochs; divided by 10
    momentum: Annotated[float, Interval(ge=0, lt=1)] = 0.9
    weight_decay: Annotated[float, Ge(0)] = 5e-4  # on weights; biases are not decayed


def finetune(
    backbone: AlexNet,
    images,
    targets: torch.Tensor,
    num_outputs: int,
    config: FinetuneConfig,
    device: torch.device,
    seed: int,
    multi_label: bool = False,
    log: Callable[[str], None] = print,
    task: str = "finetune",
    curve: Callable[[dict[str, float], int], None] | None = None,
    first_step: int = 0,
) -> AlexNet:
    """A copy of ``backbone`` with a new ``num_outputs``-way fc8, every layer trained on ``images``
    with random crops of the model's resolution and flips.

    ``images``: uint8 N x 3 x S x S (S >= the model's resolution), or anything with ``len`` whose
    ``[positions]`` (a 1-d int64 tensor) gives such a batch (``images.SquareImages``, which decodes
    batch by batch). ``targets``: class indices (N), or multi-hot floats (N x outputs) when
    ``multi_label``. Every random draw (the order, crops, flips, the new fc8, dropout) comes from
    ``seed``; torch's global generator is left as it was. ``curve``, when given, gets
    ``{"<task>/loss": mean loss, "<task>/lr": base rate}`` after each epoch at step ``first_step +
    epoch``. The caller's backbone is not changed."""
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    model = copy.deepcopy(backbone)
    model.replace_classifier(num_outputs, generator=generator)
    model.to(device)
    head = {id(parameter) for parameter in model.fc8.parameters()}
    groups = (parameter_groups(model, config.lr, config.weight_decay, exclude=head)
              + parameter_groups(model.fc8, config.lr, config.weight_decay, lr_mult=HEAD_LR_MULT))
    optimizer = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)  # dropout draws from torch's global generator, forked here
        for epoch in range(1, config.epochs + 1):
            lr = config.lr * 0.1 ** ((epoch - 1) // config.lr_drop_every)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_mult"]
            model.train()
            order = torch.randperm(len(images), generator=generator)
            total, steps = torch.zeros((), dtype=torch.float64, device=device), 0
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
                total += loss.detach()
                steps += 1
            mean_loss = total.item() / max(1, steps)
            if curve is not None:
                curve({f"{task}/loss": mean_loss, f"{task}/lr": lr}, first_step + epoch)
            if epoch == config.epochs or epoch % 10 == 0:
                log(f"{task}: epoch {epoch}/{config.epochs} loss {mean_loss:.3f}")
    return model


@torch.no_grad()
def predict(model: AlexNet, images, device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """Logits (N x outputs, float32, on the CPU) for center crops of ``images`` (uint8 N x 3 x S x S,
    or batches by ``[positions]`` as ``finetune`` takes them)."""
    model.eval()
    outputs = []
    for start in range(0, len(images), batch_size):
        positions = torch.arange(start, min(len(images), start + batch_size))
        batch = center_crops(images[positions], model.resolution)
        outputs.append(model(normalize(batch.to(device))).float().cpu())
    return torch.cat(outputs) if outputs else torch.empty(0)
