"""Evaluation: a run's checkpoints scored on its eval tasks (`evaluate`), bits per
character per domain (`bpc`), a checkpoint's predictions and scores on a mesh
(`predict`), and the inference run that writes them (`infer`)."""
