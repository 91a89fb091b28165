"""Prefect flows of the SpecDeepMap platform; see flows/pipelines.py."""
