# DToP step 2 (Tang et al., ICCV 2023): fine-tune a trained ViT-S UperNet (the baseline's
# checkpoint: tools/train.py --load-from work_dirs/upernet_vit-s16-sfp_ade20k/iter_160000.pth) with
# two FCN exit heads on the patch grid after blocks 5 and 7 (official ViT-B/12), each trained by
# its own loss, the backbone unreduced. The official schedule: 40k iterations, AdamW lr 2e-5,
# heads (decode, auxiliary, exit) at 10x lr. Inference with early exit: the _dtop config.
_base_ = ['./upernet_vit-s16-sfp_ade20k.py', '../_base_/models/dtop_exit-heads.py']
custom_imports = dict(imports=['models.mm_backbones', 'models.mm_dtop'], allow_failed_imports=False)
model = dict(type='DToPEncoderDecoder', exit_after=(5, 7), exit_heads=[_base_.exit_head, _base_.exit_head])
optim_wrapper = dict(optimizer=dict(lr=2e-5), paramwise_cfg=dict(custom_keys=dict(head=dict(lr_mult=10.))))
max_iters = 40000
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=1500, end=max_iters, by_epoch=False)
]
train_cfg = dict(max_iters=max_iters, val_interval=4000)
default_hooks = dict(checkpoint=dict(interval=4000))
