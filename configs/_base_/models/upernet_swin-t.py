# UperNet on timm's Swin-T (window 7, random init): its four stages, strides 4 to 32.
# Reduced configs add backbone.reduction, nothing else.
_base_ = 'mmseg::_base_/models/upernet_r50.py'
custom_imports = dict(imports=['models.mm_backbones'], allow_failed_imports=False)
model = dict(
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type='TokenReduceBackbone',
        model_name='swin_tiny_patch4_window7_224',
        out_indices=(0, 1, 2, 3),
        img_size=512,
        strict_img_size=False,
        drop_path_rate=0.3),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384, in_index=2))
