# The imgsearch REST service (CPU). docker-compose.yml runs it next to Milvus 2.6 standalone.
FROM python:3.11-slim
WORKDIR /app
# CPU wheels of the pinned torch keep the image small.
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu torch==2.14.1 torchvision==0.29.1
COPY pyproject.toml setup.py README.md ./
COPY imgsearch ./imgsearch
COPY ingest ./ingest
COPY api ./api
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu ".[s3]"
ENV IMGSEARCH_UPLOAD_DIR=/data/uploads IMGSEARCH_ONNX_CACHE=/data/onnx
EXPOSE 8000
CMD ["imgsearch", "serve", "--host", "0.0.0.0", "--port", "8000"]
