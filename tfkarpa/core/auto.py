"""Settings left at `auto`, chosen from the data once it is loaded.

Defaults tuned on one data set do not fit another: a 64-pixel input for 300-pixel photographs,
20 epochs whether that is 200 optimizer steps or 20,000. So the size-dependent keys default to
auto (`data.image_size=0`, `epochs=0`, `data.augment=auto`), and `resolve` fills them in from
what the source holds, by the task's `AutoRules`:

- input side: the median longer side of the source's images (letterboxing keeps the whole
  image), rounded to the model's stride and kept within the task's bounds (a size the run must
  use, its backbone's or its teacher's, the task sets first); generated sets report the size
  they draw at;
- training length: `steps` when given; else a number of training samples to see, turned into
  epochs from the training split's size and kept within the task's epoch bounds;
- augmentation: the task's choice for small training splits (mosaic for small detection sets)
  or for large ones;
- the model, for `model=auto` (the recipe of a task with a `Transfer` rule): below the rule's
  size a pretrained network with its ImageNet weights, at an input side, training length and
  learning rate meant for fine-tuning; at or above it the task's model from scratch.

Any key set by the user (or a recipe) is kept. The choices are logged in one line and returned
so the fit loop writes them to the manifest; the run's config.yaml holds the resolved values,
so evaluating, exporting or resuming the run uses exactly what it trained with.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math

from tfkarpa import config as config_lib
from tfkarpa.errors import TfkarpaError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Transfer:
    """`model=auto`: fine-tune `model` from ImageNet below `below` training images, else train
    `scratch`. Small sets are where learned-from-scratch features fail (too few images to learn
    edges and textures from); ImageNet features do not need them. The sides and samples size
    every run that starts from ImageNet (chosen or named), the rate every run whose
    `optimizer.lr` is 0 (auto)."""

    model: str
    scratch: str
    below: int
    min_size: int  # ImageNet features need some pixels: small images are upsampled to this
    max_size: int
    samples: int
    lr: float  # fine-tuning rate; `scratch_lr` for the model trained from scratch
    scratch_lr: float
    min_epochs: int | None = None  # fine-tuning needs fewer passes: else the task's own bound


@dataclasses.dataclass(frozen=True)
class AutoRules:
    """How a task fills in settings left at auto. Sizes in pixels; samples = images seen."""

    min_size: int = 32
    max_size: int = 128  # CPUs are the common case; set data.image_size to go higher
    stride: int = 8  # input sides are multiples of this
    samples: int = 48_000  # training images seen when neither epochs nor steps is given
    min_epochs: int = 10
    max_epochs: int = 100
    small_data: int = 0  # training splits below this many images are "small"
    small_augment: str = "light"
    large_augment: str = "light"
    transfer: Transfer | None = None  # how `model=auto` is resolved; None: the task has no auto


def choose_model(cfg: config_lib.Config, train: int, rules: AutoRules) -> dict:
    """Fill in `model=auto` from the training split's size; the choice made."""
    rule = rules.transfer
    if rule is None:
        raise TfkarpaError("config key 'model.name': auto is for classification and "
                           "detection on your own data; name a model")
    choices = {}
    if train < rule.below:
        cfg.model.name = rule.model
        if not cfg.model.weights:
            cfg.model.weights = "imagenet"
        why = (f"{train} training images, under {rule.below}: fine-tune from ImageNet "
               f"(weights={cfg.model.weights}); model={rule.scratch} trains from scratch")
    else:
        cfg.model.name = rule.scratch
        why = (f"{train} training images, at least {rule.below}: enough to learn from scratch; "
               f"model={rule.model} fine-tunes ImageNet weights")
    choices["model.name"] = {"value": cfg.model.name, "why": why}
    return choices


def choose_lr(cfg: config_lib.Config, rules: AutoRules) -> dict:
    """`optimizer.lr=0`: the rule's fine-tuning rate for a model starting from ImageNet, its
    scratch rate otherwise (also when the user named the model over the recipe's auto)."""
    if cfg.optimizer.lr != 0 or rules.transfer is None:
        return {}
    tuned = cfg.model.weights == "imagenet"
    cfg.optimizer.lr = rules.transfer.lr if tuned else rules.transfer.scratch_lr
    why = "fine-tuning from ImageNet" if tuned else "training from scratch"
    return {"optimizer.lr": {"value": cfg.optimizer.lr, "why": f"{cfg.model.name}, {why}"}}


def image_side(sizes: list[tuple[int, int]] | None, rules: AutoRules) -> tuple[int, str]:
    """(input side, why) from (width, height) image sizes."""
    if not sizes:
        return rules.min_size, "the source does not record image sizes"
    sides = sorted(max(w, h) for w, h in sizes)
    median = sides[len(sides) // 2]
    side = int(round(median / rules.stride)) * rules.stride
    side = max(rules.min_size, min(rules.max_size, side))
    bounds = f"{rules.min_size}..{rules.max_size}, multiple of {rules.stride}"
    return side, f"median longer image side {median} px ({bounds})"


def resolve(cfg: config_lib.Config, data, rules: AutoRules,
            steps_per_epoch) -> tuple[config_lib.Config, dict]:
    """A copy of `cfg` with the auto keys filled in, and {key: {"value", "why"}} for each.

    `data` is what the task loaded (`splits`, and `image_sizes` when the source knows them);
    `steps_per_epoch(batch_size)` counts the training split's steps. A size the run must use
    (its backbone's, its teacher's) the task has already set in `check_model`.
    """
    cfg = copy.deepcopy(cfg)
    choices = {}
    train = data.splits["train"].num_examples
    if cfg.model.name == "auto":
        choices = choose_model(cfg, train, rules)
    choices.update(choose_lr(cfg, rules))
    if rules.transfer and cfg.model.weights == "imagenet":  # sized for fine-tuning
        rule = rules.transfer
        rules = dataclasses.replace(rules, min_size=rule.min_size, max_size=rule.max_size,
                                    samples=rule.samples,
                                    min_epochs=rule.min_epochs or rules.min_epochs)
    if cfg.data.image_size == 0:
        side, why = image_side(getattr(data, "image_sizes", None), rules)
        cfg.data.image_size = side
        choices["data.image_size"] = {"value": side, "why": why}
    if cfg.data.augment == "auto":
        small = train < rules.small_data
        cfg.data.augment = rules.small_augment if small else rules.large_augment
        why = (f"{train} training images, {'under' if small else 'at least'} {rules.small_data}"
               if rules.small_augment != rules.large_augment else "the task's choice at any size")
        choices["data.augment"] = {"value": cfg.data.augment, "why": why}
    per_epoch = steps_per_epoch(cfg.batch_size)
    if cfg.steps:
        cfg.epochs = max(1, math.ceil(cfg.steps / per_epoch))
        choices["epochs"] = {"value": cfg.epochs, "why": f"steps={cfg.steps} at {per_epoch} "
                                                         f"steps of {cfg.batch_size} per epoch"}
    elif cfg.epochs == 0:
        wanted = math.ceil(rules.samples / max(1, train))
        cfg.epochs = max(rules.min_epochs, min(rules.max_epochs, wanted))
        choices["epochs"] = {"value": cfg.epochs,
                             "why": f"about {rules.samples} images seen over {train} training "
                                    f"images ({rules.min_epochs}..{rules.max_epochs} epochs), "
                                    f"{cfg.epochs * per_epoch} steps of {cfg.batch_size}"}
    if choices:
        shown = ", ".join(f"{key}={c['value']} ({c['why']})" for key, c in choices.items())
        log.info("chosen from the data: %s; set any of them to override", shown)
    return cfg, choices
