"""imgsearch: image similarity search and recognition backed by Milvus."""

import os

# gRPC core logs to stderr on its own (e.g. when decode workers fork); it reads this before pymilvus loads it.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

__version__ = "0.1.0"
