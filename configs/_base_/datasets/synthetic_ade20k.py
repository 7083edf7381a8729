# The tiny synthetic set of tools/make_synthetic_dense.py (coloured shapes on textured
# backgrounds, 128x128) in ADE20K's layout: images/{training,validation}/*.jpg and
# annotations/{training,validation}/*.png, label 0 unused, classes from 1 (reduce_zero_label).
# Data root: DATA_ROOT or --data-root (default: the tool's default output).
dataset_type = 'BaseSegDataset'
data_root = '{{$DATA_ROOT:/tmp/tokenreduce-synthetic/ade20k}}'
metainfo = dict(
    classes=('background', 'circle', 'square', 'triangle'),
    palette=[[120, 120, 120], [220, 20, 60], [20, 220, 60], [60, 20, 220]])
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs')
]
train_dataloader = dict(
    batch_size=4,
    num_workers=0,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        metainfo=metainfo,
        reduce_zero_label=True,
        data_prefix=dict(img_path='images/training', seg_map_path='annotations/training'),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1,
    num_workers=0,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        metainfo=metainfo,
        reduce_zero_label=True,
        data_prefix=dict(img_path='images/validation', seg_map_path='annotations/validation'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator
