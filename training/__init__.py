"""DINO training: self-distillation with no labels (Caron et al., ICCV 2021).

Stands on the torch-free core (:mod:`dino`) and never imports the service. Layout, one concept per
module:

- ``config``          the typed training configuration (YAML + CLI overrides; ``--help`` from comments)
- ``backbone``        timm Vision Transformers used as student/teacher backbones
- ``head``            the DINO projection head
- ``multicrop``       the wrapper that runs every crop through backbone + head
- ``loss``            the DINO loss (centring + sharpening)
- ``augmentation``    the multi-crop augmentation and the evaluation transform
- ``data``            the unlabelled image-folder dataset
- ``schedules``       cosine / warm-up schedules
- ``monitors``        collapse monitors (teacher entropy, KL)
- ``distributed``     device and torchrun process-group set-up
- ``checkpoint``      atomic checkpoints and resume
- ``train``           the training loop (``dino train``)
- ``plots``           training curves
- ``knn``             weighted k-NN evaluation (``dino knn``)
- ``weights``         safe loading of checkpoints and pretrained ViT weights
- ``export_graph``    the exported graph: embedding, patch tokens and [CLS] attention in one pass
- ``export``          a backbone to an ONNX model folder
- ``export_cli``      ``dino export``
- ``import_weights``  ``dino import``
- ``visualize``       attention figures from an exported model
- ``attention_boxes`` how much [CLS] attention lands inside hand-drawn object boxes
"""
