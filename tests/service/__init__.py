"""The service: preprocessing, the gallery, the HTTP API in-process, and real ``dino serve`` processes."""
