# Mask R-CNN, timm ViT-S/16 + simple feature pyramid + FPN, COCO instances, 1x schedule with
# AdamW; random init, nothing is downloaded.
_base_ = [
    '../_base_/models/mask-rcnn_vit-s16-sfp_fpn.py', '../_base_/datasets/coco_instance.py',
    'mmdet::_base_/schedules/schedule_1x.py', 'mmdet::_base_/default_runtime.py'
]
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(_delete_=True, type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(custom_keys=dict(pos_embed=dict(decay_mult=0.), cls_token=dict(decay_mult=0.),
                                        norm=dict(decay_mult=0.))))
