"""imgsearch: image similarity search and recognition backed by Milvus."""

__version__ = "0.1.0"
