"""Thin Prefect tasks around the core library (retries, caching, artifacts).

Each task validates nothing itself beyond what the core does, calls one core function, returns
plain data (URIs, metrics) and publishes a Prefect artifact. Business logic lives in
``specdeepmap``; these wrappers only add orchestration.
"""

from specdeepmap import hide_triton_without_gpu

hide_triton_without_gpu()  # before the steps import torch (flows/__init__.py says why)

from tasks.steps import (  # noqa: E402
    champion_task,
    check_labels_task,
    chip_task,
    evaluate_task,
    map_scene_task,
    model_card_task,
    monitor_task,
    promote_task,
    split_task,
    train_task,
)

__all__ = [
    "champion_task",
    "check_labels_task",
    "chip_task",
    "evaluate_task",
    "map_scene_task",
    "monitor_task",
    "model_card_task",
    "promote_task",
    "split_task",
    "train_task",
]
