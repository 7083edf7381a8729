# The ViT-S baseline with Expedit token clustering (Liang et al., NeurIPS 2022): the 32x32 patch
# tokens clustered to 20x20 after block 5, blocks 6-11 run on the clusters, reconstruction to
# the full grid at the end. (Official names: clustering_location, num_spixels.)
_base_ = './upernet_vit-s16-sfp_ade20k.py'
model = dict(backbone=dict(reduction=dict(type='cluster', location=5, grid=(20, 20), mode='restore')))
