# The ViT-S baseline with Expedit token clustering: the patch tokens clustered to 0.49 of the grid (70 % per side: 50x84 -> 35x59 at 800x1344)
# after block 5, blocks 6-11 run on the clusters, reconstruction to the full grid at the end.
# (Official names: clustering_location, num_spixels.)
_base_ = './mask-rcnn_vit-s16-sfp_fpn_1x_coco.py'
model = dict(backbone=dict(reduction=dict(type='cluster', location=5, grid=0.49, mode='restore')))
