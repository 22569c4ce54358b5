"""S3 storage: checkpoint discovery and sync, the versioned artifact store, aliases, retention.

Light package: boto3 only (no torch/onnx, no Airflow), so the Airflow side can use it with
`S3Hook(aws_conn_id).get_conn()` and pods with `export_lib.storage.s3.make_client()`. Every function takes
the S3 client as an argument: one implementation for both.
"""
