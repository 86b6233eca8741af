"""Tuning: the one training loop every defense and `train` use, its SGD and its CUDA-graph replay.

- loop: `tune` (data on the device, no per-step sync) and its settings and epoch log
- sgd: SGD with momentum and its schedules, without torch.optim, and `SgdSettings`, the settings of
  every SGD run (defenses, `train`, the retuning check) declared once
- graphed_step: one training step captured as a CUDA graph and replayed
"""

from .loop import EpochLog, TuneSettings, steps_per_epoch, tune
from .sgd import SgdSettings

__all__ = ["EpochLog", "SgdSettings", "TuneSettings", "steps_per_epoch", "tune"]
