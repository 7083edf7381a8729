# The ViT-S baseline with ToMe in restore mode: 48 tokens merged per block (-32 % backbone
# GFLOPs at 512x512), every position gets its token back after the last block.
_base_ = './upernet_vit-s16-sfp_ade20k.py'
model = dict(backbone=dict(reduction=dict(type='tome', r=48, mode='restore')))
