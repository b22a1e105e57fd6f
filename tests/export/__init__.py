"""``dino export`` and ``dino import``: the ONNX model folder, its parity with PyTorch, and what reads it."""
