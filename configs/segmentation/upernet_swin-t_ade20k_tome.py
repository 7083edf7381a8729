# The Swin-T baseline with ToMe inside each window: half of each window's tokens merged in the
# blocks where it acts, restored before the window reverse (the grid stays whole).
_base_ = './upernet_swin-t_ade20k.py'
model = dict(backbone=dict(reduction=dict(type='tome', ratio=0.5, mode='restore')))
