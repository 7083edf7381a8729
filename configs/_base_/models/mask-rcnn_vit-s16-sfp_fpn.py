# Mask R-CNN on a timm ViT-S/16 (random init) with ViTDet's simple feature pyramid (strides 4,
# 8, 16, 32 from the last block's map) and an FPN. Reduced configs add backbone.reduction.
_base_ = 'mmdet::_base_/models/mask-rcnn_r50_fpn.py'
custom_imports = dict(imports=['models.mm_backbones'], allow_failed_imports=False)
model = dict(
    backbone=dict(
        _delete_=True,
        type='TokenReduceBackbone',
        model_name='vit_small_patch16_224',
        out_indices=(11, ),
        pyramid_scales=(4, 2, 1, 0.5),
        img_size=1024,
        dynamic_img_size=True,
        drop_path_rate=0.1),
    neck=dict(in_channels=[96, 192, 384, 384]))
