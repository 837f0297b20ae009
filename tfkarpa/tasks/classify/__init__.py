"""Image classification: `task.ClassifyTask` (training, artifacts), `predict` (predictors),
`evaluate` (metrics and reports), `serving` (SavedModel and TFLite exports), `compress` (TF-MOT
stages as runs), `report` (its report sections)."""
