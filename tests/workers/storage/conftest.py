"""The S3 server fixtures (tests/s3server.py) for the storage tests."""

from tests.s3server import s3_env, s3_server  # noqa: F401 - fixtures
