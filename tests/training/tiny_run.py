"""The smallest real DINO configuration, shared by the tests that run ``dino train`` end to end."""

#: a ViT-Tiny/8 on 32 px global and 16 px local crops: seconds per epoch on a CPU
TINY_MODEL = "--arch vit_tiny --patch-size 8 --global-size 32 --local-size 16 --local-crops 2".split()
