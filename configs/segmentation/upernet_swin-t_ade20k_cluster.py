# The Swin-T baseline with Expedit token clustering: each 7x7 window of stage 3 clustered to 5x5
# after block 6 (of 12), the rest of the stage on the clusters, reconstruction before the patch
# merging. (Official names: clustering_location, num_spixels.)
_base_ = './upernet_swin-t_ade20k.py'
model = dict(backbone=dict(reduction=dict(type='cluster', location=6, grid=(5, 5), mode='restore')))
