# The ViT-S baseline with ToMe in restore mode: 160 tokens merged per block (about -30 % backbone
# GFLOPs at 800x1344), every position gets its token back after the last block.
_base_ = './mask-rcnn_vit-s16-sfp_fpn_1x_coco.py'
model = dict(backbone=dict(reduction=dict(type='tome', r=160, mode='restore')))
