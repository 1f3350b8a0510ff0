"""The catalog-to-Milvus pipeline: catalog.py (scan, manifests, shards) → plan.py (hash, diff) → reader.py (decode
in workers) → pipeline.py (encode in batches) → writer.py (upsert on a background thread); enroll.py and
reindex.py feed it other sources."""
