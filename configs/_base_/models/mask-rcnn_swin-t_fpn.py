# Mask R-CNN on timm's Swin-T (window 7, random init) with an FPN on its four stages.
# Reduced configs add backbone.reduction, nothing else.
_base_ = 'mmdet::_base_/models/mask-rcnn_r50_fpn.py'
custom_imports = dict(imports=['models.mm_backbones'], allow_failed_imports=False)
model = dict(
    backbone=dict(
        _delete_=True,
        type='TokenReduceBackbone',
        model_name='swin_tiny_patch4_window7_224',
        out_indices=(0, 1, 2, 3),
        strict_img_size=False,
        drop_path_rate=0.2),
    neck=dict(in_channels=[96, 192, 384, 768]))
