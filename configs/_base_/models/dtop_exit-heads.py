# The DToP exit head (models/mm_dtop.py) for a ViT-S (384 channels): an FCN head on the patch
# grid, trained by its own loss. Configs place copies with DToPEncoderDecoder's exit_heads; this
# file only holds the head, since two bases may not both set `model`.
exit_head = dict(
    type='FCNHead',
    in_channels=384,
    in_index=0,
    channels=256,
    num_convs=1,
    concat_input=False,
    dropout_ratio=0.1,
    num_classes=150,
    norm_cfg=dict(type='SyncBN', requires_grad=True),
    align_corners=False,
    loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=0.4))
