"""Instance segmentation on the core: the detection task with masks.

`SegmentTask` is `DetectTask` with what masks change: the models (`mask_rcnn_*`,
`cascade_mask_rcnn_*`: the two-stage detectors with a mask head), the data (shapes draws each
object's exact visible mask; `coco:` files bring polygons or RLE, read and checked by
`data.masks`), the batches (`make_mask_dataset`: masks letterboxed with the images) and the
numbers it keeps: COCO mask mAP (pycocotools, iouType segm) picks the best epoch and heads the
run's metrics, box mAP beside it. Evaluation, pictures, predictions and exports are the
detection task's, which carry masks wherever a model has them: reports show box and mask AP,
pictures tint each mask in its class colour, predictions and results files hold COCO RLE, the
SavedModel returns masks in the input image's pixels and TFLite files box-relative maps.
"""

from __future__ import annotations

from tfkarpa.core.auto import AutoRules
from tfkarpa.data import detection as det_data
from tfkarpa.errors import TfkarpaError
from tfkarpa.models import detectors
from tfkarpa.tasks.detect.task import DetectTask


class SegmentTask(DetectTask):
    """Train a Mask R-CNN; deliver test-split COCO mask and box metrics and a checked
    SavedModel."""

    name = "segment"
    key_metric = "test_mask_map"
    val_metric = "val_mask_map"
    default_recipe = "shapes_mask_rcnn"
    data_recipe = "segment"
    # As the detection task's, without augmentation: keras-cv's layers move boxes, not masks
    # (training flips masks with the images: `data.flip`).
    auto = AutoRules(min_size=64, max_size=256, stride=32, samples=48_000, min_epochs=20,
                     max_epochs=300, small_data=2000, small_augment="off", large_augment="off")

    def check_model(self, cfg) -> None:
        if cfg.data.mix != "off" or cfg.model.drop_path or cfg.adversarial.method != "off":
            raise TfkarpaError("data.mix, model.drop_path and adversarial training are for "
                               "classifiers, not task=segment")
        detectors.check_segmenter(cfg.model.name)
        detectors.check_input(cfg.model.name, (cfg.data.image_size,) * 2)
        if cfg.data.augment not in ("off", "auto"):
            raise TfkarpaError(f"config key 'data.augment': task=segment trains without "
                               f"augmentation layers (keras-cv's move boxes, not masks), got "
                               f"'{cfg.data.augment}'; data.flip=true still flips images with "
                               "their masks")

    def load_data(self, cfg) -> det_data.DetectionData:
        if cfg.data.labels != "100%":
            raise TfkarpaError("data.labels (label budgets) applies to classification, not "
                               "task=segment")
        return det_data.load(cfg.data, cfg.seed, with_masks=True)

    def dataset(self, split, cfg, training: bool, boxes: int, **options):
        """Batches of (images, {"boxes", "classes", "masks"})."""
        return det_data.make_mask_dataset(split, cfg, training, boxes, **options)


TASK = SegmentTask()
