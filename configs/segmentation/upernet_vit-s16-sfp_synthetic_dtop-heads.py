# The synthetic ViT-S UperNet with the ADE20K config's DToP exit heads after blocks 5 and 7,
# narrowed (32 channels, 4 classes), trained by their own losses on the unreduced backbone: a CPU
# check of the DToP pipeline.
_base_ = ['./upernet_vit-s16-sfp_synthetic.py', '../_base_/models/dtop_exit-heads.py']
custom_imports = dict(imports=['models.mm_backbones', 'models.mm_dtop'], allow_failed_imports=False)
exit_head = dict(_base_.exit_head, channels=32, num_classes=4)
model = dict(type='DToPEncoderDecoder', exit_after=(5, 7), exit_heads=[exit_head, exit_head])
