# UperNet on a timm ViT-S/16 (random init) with ViTDet's simple feature pyramid: strides 4, 8,
# 16, 32 from the last block's map. Reduced configs add backbone.reduction, nothing else.
_base_ = 'mmseg::_base_/models/upernet_r50.py'
custom_imports = dict(imports=['models.mm_backbones'], allow_failed_imports=False)
model = dict(
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type='TokenReduceBackbone',
        model_name='vit_small_patch16_224',
        out_indices=(11, ),
        pyramid_scales=(4, 2, 1, 0.5),
        img_size=512,
        dynamic_img_size=True,
        drop_path_rate=0.1),
    decode_head=dict(in_channels=[96, 192, 384, 384]),
    auxiliary_head=dict(in_channels=384, in_index=2))
