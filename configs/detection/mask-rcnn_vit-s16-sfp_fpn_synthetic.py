# The ViT-S Mask R-CNN on the tiny synthetic set (tools/make_synthetic_dense.py): 128x128 images,
# 3 classes, fewer proposals and RoIs (1-3 objects an image) and a short schedule, so that
# tools/train.py and tools/test.py run on CPU in minutes. Shows that the pipeline learns; not a
# benchmark.
_base_ = [
    '../_base_/models/mask-rcnn_vit-s16-sfp_fpn.py', '../_base_/datasets/synthetic_coco_instance.py',
    'mmdet::_base_/default_runtime.py'
]
model = dict(
    backbone=dict(img_size=128),
    roi_head=dict(bbox_head=dict(num_classes=3), mask_head=dict(num_classes=3)),
    train_cfg=dict(rpn_proposal=dict(max_per_img=200), rcnn=dict(sampler=dict(num=64))),
    test_cfg=dict(rpn=dict(max_per_img=100), rcnn=dict(max_per_img=20)))
max_iters = 40
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
optim_wrapper = dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.05))
param_scheduler = [dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=10)]
default_hooks = dict(logger=dict(interval=10), checkpoint=dict(by_epoch=False, interval=max_iters))
log_processor = dict(by_epoch=False)
randomness = dict(seed=0)
