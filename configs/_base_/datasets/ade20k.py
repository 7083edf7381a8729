# ADE20K in its ADEChallengeData2016 layout, as mmseg ships it (512x512 crops, 150 classes).
# The data root comes from the user: DATA_ROOT=/path/to/ADEChallengeData2016 or --data-root.
_base_ = 'mmseg::_base_/datasets/ade20k.py'
data_root = '{{$DATA_ROOT:data/ade/ADEChallengeData2016}}'
train_dataloader = dict(dataset=dict(data_root=data_root))
val_dataloader = dict(dataset=dict(data_root=data_root))
test_dataloader = val_dataloader
