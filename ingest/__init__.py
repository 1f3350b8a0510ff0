"""The catalog-to-Milvus pipeline: scan and diff (catalog.py), then decode, encode and upsert (pipeline.py)."""
