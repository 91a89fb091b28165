"""The test suite (see tests/conftest.py for the fixtures and markers)."""
