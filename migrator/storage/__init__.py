"""S3 access. ``s3`` is the only module that calls boto3."""
