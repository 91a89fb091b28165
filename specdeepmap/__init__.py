"""SpecDeepMap: deep-learning semantic segmentation of multispectral and hyperspectral imagery.

The core library: plain functions over rasterio, numpy, torch and MLflow. Every path is a URI
(a local path, ``file://…`` or ``s3://…``). Nothing in this package imports Prefect.
"""

import logging
import os
import sys

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

#: device files of the GPUs that torch can use (NVIDIA, AMD ROCm, WSL, Intel's XPU)
GPU_DEVICE_FILES = ("/dev/nvidiactl", "/dev/kfd", "/dev/dxg", "/dev/dri")


def hide_triton_without_gpu() -> bool:
    """Make ``import triton`` fail in this process when the host has no GPU; True if hidden.

    Triton compiles GPU kernels. PyPI's torch ships it, and ``torch._dynamo`` imports it when
    it is installed; torchvision imports ``torch._dynamo``, and smp imports torchvision, so
    every process that builds a network loads Triton's 70 MB library, on a CPU-only host for
    nothing (torch compiles CPU code without it). Hidden, a mapping process peaks ~70 MB
    lower (``docs/benchmarks.md``). It is left alone where a GPU device file exists, where it
    is already imported, and when ``SPECDEEPMAP_HIDE_TRITON=0``.

    A library does not change what its users can import: the entry points call this (the
    command line, the Prefect flows and tasks, the benchmarks), before torch is imported.
    """
    if os.environ.get("SPECDEEPMAP_HIDE_TRITON", "1") == "0" or "triton" in sys.modules:
        return False
    if any(os.path.exists(path) for path in GPU_DEVICE_FILES):
        return False
    sys.modules["triton"] = None  # Python's import system: raises ModuleNotFoundError
    # torch's FLOP counter (imported by Lightning) warns once that it cannot count Triton
    # kernels, which a host without a GPU never runs
    logging.getLogger("torch.utils.flop_counter").addFilter(
        lambda record: "triton not found" not in record.getMessage()
    )
    return True
