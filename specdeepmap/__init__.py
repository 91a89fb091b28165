"""SpecDeepMap: deep-learning semantic segmentation of multispectral and hyperspectral imagery.

The core library: plain functions over rasterio, numpy, torch and MLflow. Every path is a URI
(a local path, ``file://…`` or ``s3://…``). Nothing in this package imports Prefect.
"""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
