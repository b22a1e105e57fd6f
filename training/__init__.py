"""DINO training: self-distillation with no labels (Caron et al., ICCV 2021).

Layout (one concept per module):

- ``config``        the typed training configuration (YAML + CLI overrides)
- ``backbone``      timm Vision Transformers used as student/teacher backbones
- ``head``          the DINO projection head
- ``multicrop``     the wrapper that runs every crop through backbone + head
- ``loss``          the DINO loss (centring + sharpening)
- ``augmentation``  the multi-crop augmentation
- ``data``          the unlabelled image-folder dataset
- ``schedules``     cosine / warm-up schedules
- ``monitors``      collapse monitors (teacher entropy, KL)
- ``checkpoint``    atomic checkpoints and resume
- ``knn``           weighted k-NN evaluation
- ``train``         the training loop
- ``cli``           ``dino train`` / ``dino knn`` command-line entry points
"""
