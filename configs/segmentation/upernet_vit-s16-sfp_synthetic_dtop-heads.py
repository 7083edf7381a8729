# The synthetic ViT-S UperNet with DToP exit heads after blocks 5 and 7 (narrow FCN heads),
# trained by their own losses on the unreduced backbone: a CPU check of the DToP pipeline.
_base_ = './upernet_vit-s16-sfp_synthetic.py'
custom_imports = dict(imports=['models.mm_backbones', 'models.mm_dtop'], allow_failed_imports=False)
exit_head = dict(
    type='FCNHead',
    in_channels=384,
    in_index=0,
    channels=32,
    num_convs=1,
    concat_input=False,
    dropout_ratio=0.1,
    num_classes=4,
    norm_cfg=dict(type='SyncBN', requires_grad=True),
    align_corners=False,
    loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=0.4))
model = dict(type='DToPEncoderDecoder', exit_after=(5, 7), exit_heads=[exit_head, exit_head])
