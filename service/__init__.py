"""The DINO feature-extraction service (FastAPI + onnxruntime; never imports torch)."""
