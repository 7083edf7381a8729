# The synthetic ViT-S UperNet with ToMe in restore mode (4 tokens merged per block of the 8x8 grid).
_base_ = './upernet_vit-s16-sfp_synthetic.py'
model = dict(backbone=dict(reduction=dict(type='tome', r=4, mode='restore')))
