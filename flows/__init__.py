"""Prefect flows of the SpecDeepMap platform; see flows/pipelines.py."""

from specdeepmap import hide_triton_without_gpu

hide_triton_without_gpu()  # a worker that maps on a CPU-only host: ~70 MB less per process
