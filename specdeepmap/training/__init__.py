"""Deep Learning Trainer: Lightning training logged to TensorBoard and the MLflow registry.

Class indices: channel 0 is reserved for 'unlabelled' (label value 0 and any value the dataset
does not know) and is the ignore index of the loss and the metrics; the dataset's class values
(any integers 1–255, e.g. 1, 5, 200) map to channels 1..K and back in every prediction.

IoU is computed from one confusion matrix per epoch (pooled over all pixels), the same
definition as the Tester's dataset-level IoU (SpecDeepMap averaged per-batch values).

The run, in the order it happens (one module each):

* :mod:`~specdeepmap.training.config` — the run's parameters and its result;
* :mod:`~specdeepmap.training.continuation` — where an interrupted training continues from;
* :mod:`~specdeepmap.training.prepare` — data, model configuration and network, checked
  before the first step;
* :mod:`~specdeepmap.training.data_module` — the chips an epoch draws, as Lightning loaders;
* :mod:`~specdeepmap.training.fit` and :mod:`~specdeepmap.training.checkpoints` — one
  network's training and its checkpoints mirrored to object storage;
* :mod:`~specdeepmap.training.validation` — the trained network's validation figures;
* :mod:`~specdeepmap.training.record` — the MLflow run, the registered version and its card;
* :mod:`~specdeepmap.training.run` — :func:`train`, which chains them.
"""

from specdeepmap.training.config import TrainConfig, TrainResult
from specdeepmap.training.data_module import class_balanced_weights
from specdeepmap.training.prepare import Prepared, prepare
from specdeepmap.training.run import train

__all__ = [
    "Prepared",
    "TrainConfig",
    "TrainResult",
    "class_balanced_weights",
    "prepare",
    "train",
]
