# The ViT-S UperNet on the tiny synthetic set (tools/make_synthetic_dense.py): 128x128 images,
# 4 classes, a narrower head and a short schedule, so that tools/train.py and tools/test.py run
# on CPU in a minute. Shows that the pipeline learns; not a benchmark.
_base_ = [
    '../_base_/models/upernet_vit-s16-sfp.py', '../_base_/datasets/synthetic_ade20k.py',
    'mmseg::_base_/default_runtime.py', 'mmseg::_base_/schedules/schedule_20k.py'
]
crop_size = (128, 128)
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(img_size=128),
    decode_head=dict(num_classes=4, channels=128),
    auxiliary_head=dict(num_classes=4, channels=64))
optim_wrapper = dict(_delete_=True, type='OptimWrapper', optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.01))
param_scheduler = [dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=10)]
max_iters = 40
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
default_hooks = dict(logger=dict(interval=10), checkpoint=dict(interval=max_iters))
randomness = dict(seed=0)
