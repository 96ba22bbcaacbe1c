#!/usr/bin/env python3
"""An S3 client independent of ferry (boto3, which moto brings), for the tests' checks.

  s3_tool.py ENDPOINT create-bucket BUCKET
  s3_tool.py ENDPOINT list BUCKET [PREFIX]   -> JSON {key: {size, sha256, metadata}} on stdout
  s3_tool.py ENDPOINT uploads BUCKET         -> JSON [key of every multipart upload in progress]
  s3_tool.py ENDPOINT put BUCKET PREFIX DIR  (every regular file below DIR, as PREFIX/<path>)
  s3_tool.py ENDPOINT delete BUCKET PREFIX   (every object below PREFIX/)
"""
import hashlib
import json
import os
import sys

os.environ.pop("AWS_CA_BUNDLE", None)
import boto3  # noqa: E402


def client(endpoint):
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="test",
        aws_secret_access_key="test",
        region_name="us-east-1",
    )


def main():
    endpoint, cmd, bucket = sys.argv[1:4]
    s3 = client(endpoint)
    if cmd == "create-bucket":
        s3.create_bucket(Bucket=bucket)
    elif cmd == "list":
        prefix = sys.argv[4] if len(sys.argv) > 4 else ""
        out = {}
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                got = s3.get_object(Bucket=bucket, Key=obj["Key"])
                body = got["Body"].read()
                out[obj["Key"]] = {
                    "size": len(body),
                    "sha256": hashlib.sha256(body).hexdigest(),
                    "metadata": got.get("Metadata", {}),
                }
        json.dump(out, sys.stdout)
    elif cmd == "put":
        prefix, root = sys.argv[4], sys.argv[5]
        for d, _, names in os.walk(root):
            for n in names:
                path = os.path.join(d, n)
                if os.path.isfile(path) and not os.path.islink(path):
                    rel = os.path.relpath(path, root)
                    s3.upload_file(path, bucket, f"{prefix}/{rel}" if prefix else rel)
    elif cmd == "delete":
        prefix = sys.argv[4].rstrip("/") + "/"
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                s3.delete_objects(Bucket=bucket, Delete={"Objects": keys})
    elif cmd == "uploads":
        got = s3.list_multipart_uploads(Bucket=bucket)
        json.dump([u["Key"] for u in got.get("Uploads", [])], sys.stdout)
    else:
        sys.exit(f"unknown command {cmd}")


main()
