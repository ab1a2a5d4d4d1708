"""Training: the loop, its schedule, checkpoints and resumption."""

from memext.train.trainer import TrainingDiverged, TrainResult, train

__all__ = ["TrainResult", "TrainingDiverged", "train"]
