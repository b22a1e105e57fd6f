"""The DINO feature-extraction service (FastAPI + onnxruntime).

Stands on the torch-free core (:mod:`dino`), never imports ``training`` or torch. Layout:

- ``app``           the application factory and the exception handlers (errors to HTTP statuses)
- ``routes``        the HTTP routes; ``schemas`` their pydantic models; ``dependencies`` auth
- ``settings``      the one typed settings object (``DINO_*`` environment variables)
- ``server``        ``dino serve`` (uvicorn)
- ``runtime``       the onnxruntime session of a model folder
- ``preprocess``    the evaluation transform (decoding itself is :mod:`dino.images`)
- ``uploads``       multipart / JSON request bodies and their limits
- ``batching``      the dynamic batcher
- ``state``         what one running service holds (model, batcher, gallery, pools)
- ``gallery/``      the gallery behind one interface: FAISS folder (default, crash-safe journal) or Milvus
- ``index_cli``     ``dino index build``
- ``overlay``       the attention heatmap PNG
- ``metrics``       Prometheus metrics
- ``http_protocol`` uvicorn's httptools protocol with request-head limits
- ``memory``        large freed blocks back to the system
- ``durable``       crash-safe file writes (gallery folder, dino embed)
"""
