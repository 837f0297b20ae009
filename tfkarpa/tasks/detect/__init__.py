"""Object detection: `task.DetectTask` (training, artifacts), `metrics` (COCO by pycocotools),
`predict` (predictors), `serving` (SavedModel and TFLite exports), `draw` (pictures), `report`
(its report sections)."""
