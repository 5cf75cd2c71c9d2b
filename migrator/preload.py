"""What the worker fork server loads once, so that every worker forked from it starts with the
worker code imported and botocore's S3 models parsed."""

from migrator import worker  # noqa: F401
from migrator.storage import s3

s3.warm_up()
