# UperNet, timm ViT-S/16 + simple feature pyramid, ADE20K 512x512, 160k iterations of 8x2
# images (the usual ADE20K recipe); random init, nothing is downloaded.
_base_ = [
    '../_base_/models/upernet_vit-s16-sfp.py', '../_base_/datasets/ade20k.py',
    'mmseg::_base_/default_runtime.py', 'mmseg::_base_/schedules/schedule_160k.py'
]
crop_size = (512, 512)
model = dict(
    data_preprocessor=dict(size=crop_size),
    decode_head=dict(num_classes=150),
    auxiliary_head=dict(num_classes=150),
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(341, 341)))
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(custom_keys=dict(pos_embed=dict(decay_mult=0.), cls_token=dict(decay_mult=0.),
                                        norm=dict(decay_mult=0.))))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=1500, end=160000, by_epoch=False)
]
train_dataloader = dict(batch_size=2)
