"""The paper's other evaluations, run through the service's own path (Caron et al. 2021, Sec. 4.2).

- ``retrieval``   ``dino retrieval``: image retrieval on labelled folders (mAP, recall@k, precision@k),
                  the protocol of the paper's revisited Oxford/Paris evaluation
- ``copydetect``  ``dino copydetect``: copy detection on a generated Copydays-like "strong" set
                  (µAP, recall@1), with the paper's [CLS] + GeM features and whitening
- ``copies``      the deterministic copy generator (crops, rotations, JPEG, blur, colour, text, patches)
- ``features``    images -> features through the service's preprocessing, OnnxModel and gallery;
                  the pixel baseline; PCA whitening
- ``metrics``     average precision, µAP, recall@k, precision@k

Everything here uses what ``dino serve`` uses (:mod:`service.preprocess`, :class:`service.runtime.OnnxModel`,
:class:`service.gallery.EmbeddingIndex`), so the numbers describe the served system. No torch.
"""
