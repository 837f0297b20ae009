"""SimCLR contrastive pretraining: `task.PretrainTask`, `views` (augmented pairs), `model` (the
encoder, projection head and NT-Xent), `monitor` (kNN, linear probe, projector)."""
