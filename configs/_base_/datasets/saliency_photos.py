# Photos with reference saliency masks, as tools/make_saliency_reference.py writes them (ADE20K-like
# layout): images/validation/<name>.JPEG (links to the photos, which stay where they are) and
# annotations/validation/<name>.png (0 background, 1 salient: the unreduced network's map > 0.5).
# Data root: DATA_ROOT or --data-root (default: the tool's default output).
dataset_type = 'BaseSegDataset'
data_root = '{{$DATA_ROOT:/tmp/tokenreduce-saliency}}'
metainfo = dict(classes=('background', 'salient'), palette=[[0, 0, 0], [255, 255, 255]])
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(224, 224), keep_ratio=True, interpolation='area'),  # longest side 224
    dict(type='LoadAnnotations'),  # after Resize: scored at the photo's own size
    dict(type='PackSegInputs')
]
test_dataloader = dict(
    batch_size=1,
    num_workers=0,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        metainfo=metainfo,
        img_suffix='.JPEG',
        seg_map_suffix='.png',
        data_prefix=dict(img_path='images/validation', seg_map_path='annotations/validation'),
        pipeline=test_pipeline))
test_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_cfg = dict(type='TestLoop')
