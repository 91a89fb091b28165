"""The ``specdeepmap`` command line: one sub-command per step of the pipeline.

``app`` (with the error handling every command shares) is in :mod:`.app`; the commands are in
:mod:`.prepare` (sample-data, stack-bands, chip, split), :mod:`.model` (train, test, baseline,
promote) and :mod:`.mapping` (map). Step options are generated from the parameter models of
:mod:`specdeepmap.params` by :mod:`.options`.
"""

from specdeepmap.cli import mapping, model, prepare  # noqa: F401 - they register the commands
from specdeepmap.cli.app import app, describe_error

__all__ = ["app", "describe_error"]
