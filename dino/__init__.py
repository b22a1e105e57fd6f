"""The torch-free core that training and serving share.

- ``model_folder``  the model folder contract: file names, outputs, ``model.json`` (ModelMetadata)
- ``images``        image listing, safe decoding, EXIF orientation, pixel modes to RGB
- ``attention``     [CLS] attention maps: head selection and DINO's mass threshold
- ``data_dir``      where the real image data lives (``DINO_DATA_DIR``)
- ``cli``           the ``dino`` command, which loads ``training`` or ``service`` per subcommand
- ``client``        the Python client of the HTTP API (``DinoClient``, ``AsyncDinoClient``; needs httpx)

It imports neither ``training`` nor ``service`` (nor torch): both stand on it.
"""
