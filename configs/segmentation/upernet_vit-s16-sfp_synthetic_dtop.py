# The synthetic DToP model with early exit at p0=0.9 (models/mm_dtop.py).
_base_ = './upernet_vit-s16-sfp_synthetic_dtop-heads.py'
model = dict(backbone=dict(reduction=dict(type='dtop', p0=0.9, top_k=5, mode='restore')))
