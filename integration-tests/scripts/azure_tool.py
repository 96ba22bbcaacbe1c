#!/usr/bin/env python3
"""An Azure Blob client independent of ferry (azure-storage-blob), for the tests' checks against
azurite's well-known development account.

  azure_tool.py BLOB_ENDPOINT create-container CONTAINER
  azure_tool.py BLOB_ENDPOINT list CONTAINER [PREFIX]  -> JSON {name: {size, sha256, metadata}}
"""
import hashlib
import json
import sys

from azure.storage.blob import BlobServiceClient

# azurite's well-known development account (public, documented by Microsoft).
ACCOUNT = "devstoreaccount1"
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def main():
    endpoint, cmd, container = sys.argv[1:4]
    conn = (
        f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};"
        f"BlobEndpoint={endpoint}/{ACCOUNT};"
    )
    svc = BlobServiceClient.from_connection_string(conn)
    if cmd == "create-container":
        svc.create_container(container)
    elif cmd == "list":
        prefix = sys.argv[4] if len(sys.argv) > 4 else None
        c = svc.get_container_client(container)
        out = {}
        for b in c.list_blobs(name_starts_with=prefix, include=["metadata"]):
            body = c.download_blob(b.name).readall()
            out[b.name] = {
                "size": len(body),
                "sha256": hashlib.sha256(body).hexdigest(),
                "metadata": b.metadata or {},
            }
        json.dump(out, sys.stdout)
    else:
        sys.exit(f"unknown command {cmd}")


main()
