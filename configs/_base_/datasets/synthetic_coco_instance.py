# The tiny synthetic set of tools/make_synthetic_dense.py (coloured shapes on textured
# backgrounds, 128x128) in COCO's layout: {train,val}2017/*.jpg and
# annotations/instances_{train,val}2017.json (boxes and polygon masks).
# Data root: DATA_ROOT or --data-root (default: the tool's default output).
_base_ = 'mmdet::_base_/datasets/coco_instance.py'
data_root = '{{$DATA_ROOT:/tmp/tokenreduce-synthetic/coco}}/'
metainfo = dict(classes=('circle', 'square', 'triangle'), palette=[(220, 20, 60), (20, 220, 60), (60, 20, 220)])
image_size = (128, 128)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=image_size, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=image_size, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))
]
train_dataloader = dict(
    batch_size=2,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(data_root=data_root, metainfo=metainfo, pipeline=train_pipeline))
val_dataloader = dict(
    num_workers=0,
    persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo, pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val2017.json')
test_evaluator = val_evaluator
