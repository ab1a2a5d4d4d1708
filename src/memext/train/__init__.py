"""Training: the loop, its schedule, checkpoints and resumption."""

from memext.train.trainer import TrainingDiverged, TrainResult, build_optimizer, train, train_step

__all__ = ["TrainResult", "TrainingDiverged", "build_optimizer", "train", "train_step"]
