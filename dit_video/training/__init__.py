"""Training machinery shared by the stages: the DeepSpeed engine, checkpoints, EMA, the run log."""
