"""Training: loss, schedules, the network, augmentation, config, k-NN and real ``dino train`` runs."""
