# DToP inference on the fine-tuned _dtop-heads model: a token whose exit head's top class
# probability exceeds p0=0.9 (official ViT-B) leaves the later blocks, except the 5 most
# confident of each class; the map takes its frozen prediction (models/mm_dtop.py).
_base_ = './upernet_vit-s16-sfp_ade20k_dtop-heads.py'
model = dict(backbone=dict(reduction=dict(type='dtop', p0=0.9, top_k=5, mode='restore')))
