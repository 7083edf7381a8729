# The ViT-S baseline with Expedit token clustering: the patch tokens clustered to a 32x32 grid
# after block 5, blocks 6-11 run on the clusters, reconstruction to the full grid at the end.
# Option names follow issue 8 (official: clustering_location, num_spixels).
_base_ = './mask-rcnn_vit-s16-sfp_fpn_1x_coco.py'
model = dict(backbone=dict(reduction=dict(type='cluster', location=5, num_clusters=(32, 32), mode='restore')))
