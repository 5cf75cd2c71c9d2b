"""S3 access. ``s3`` builds the boto3 clients (one side's credentials each) and makes the S3
calls; ``stream`` streams copies between two sides' clients; ``sides`` picks the services a
process needs for a job."""
