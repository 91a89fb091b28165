"""``python -m specdeepmap.cli``."""

from specdeepmap.cli import app

app()
