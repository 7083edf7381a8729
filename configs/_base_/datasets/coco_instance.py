# COCO 2017 instances (boxes and masks), as mmdet ships it.
# The data root comes from the user: DATA_ROOT=/path/to/coco or --data-root.
_base_ = 'mmdet::_base_/datasets/coco_instance.py'
data_root = '{{$DATA_ROOT:data/coco}}/'
train_dataloader = dict(dataset=dict(data_root=data_root))
val_dataloader = dict(dataset=dict(data_root=data_root))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val2017.json')
test_evaluator = val_evaluator
