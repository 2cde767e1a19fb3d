"""The one training loop and the one evaluation routine that everything in rnp uses."""

from rnp.training.evaluate import predict
from rnp.training.loop import EpochStats, StepInfo, run_epoch
from rnp.training.trainer import TrainConfig, train

__all__ = ["predict", "EpochStats", "StepInfo", "run_epoch", "TrainConfig", "train"]
