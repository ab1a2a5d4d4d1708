"""Training: the loop, its schedule, checkpoints and resumption."""

from memext.train.trainer import TrainingDiverged, TrainResult, train, train_step

__all__ = ["TrainResult", "TrainingDiverged", "train", "train_step"]
