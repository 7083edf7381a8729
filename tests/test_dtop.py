"""DToP early exit: the exit rule, batching with padding, restore of frozen tokens, FLOPs."""
import pytest
import timm
import torch
from torch import nn

import tokenreduce
from tokenreduce.flops import count_flops_per_image
from tokenreduce.methods.dtop import ExitRecord, exit_decision, exit_reduction

NUM_CLASSES = 3


def make_model() -> nn.Module:
    """Random-weight DINOv2-style ViT (LayerScale, 7x7 patch grid, 6 blocks)."""
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch14_dinov2", img_size=98, depth=6, init_values=1.0,
                             pretrained=False).eval()


def make_heads(count: int = 2, scale: float = 0.3) -> list[nn.Module]:
    """Random 1x1-convolution heads: per-token class logits, confident enough that
    some tokens pass p0=0.9 and others do not."""
    torch.manual_seed(1)
    heads = [nn.Conv2d(384, NUM_CLASSES, 1) for _ in range(count)]
    for head in heads:
        nn.init.normal_(head.weight, std=scale)
        head.requires_grad_(False)  # not submodules of the traced backbone: fvcore needs them constant
    return heads


def images(batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, 3, 98, 98, generator=torch.Generator().manual_seed(2))


def apply_dtop(model: nn.Module, **options) -> nn.Module:
    options = {"exit_after": (1, 3), "heads": make_heads(len(options.get("exit_after", (1, 3)))), **options}
    return tokenreduce.apply(model, "dtop", mode="restore", **options)


def block_output(model: nn.Module, x: torch.Tensor, block: int) -> torch.Tensor:
    """Tokens after ``block`` of the unpatched model."""
    outputs = {}
    handle = model.blocks[block].register_forward_hook(lambda m, i, o: outputs.setdefault("x", o))
    with torch.no_grad():
        model.forward_features(x)
    handle.remove()
    return outputs["x"]


def test_exit_rule_keeps_the_top_k_confident_tokens_of_each_class():
    # 6 tokens, 2 classes; confidences (softmax max) from these logits
    logits = torch.tensor([[[4.0, 0], [3, 0], [2, 0], [0, 5], [0.1, 0], [0, 1]]])
    valid = torch.ones(1, 6, dtype=torch.bool)
    # p0=0.6: confident are tokens 0, 1, 2 (class 0), 3 (class 1), 5 (class 1: 0.73); 4 is not (0.52)
    # top_k=1 keeps the most confident of each class: token 0 (class 0) and token 3 (class 1)
    assert exit_decision(logits, valid, 0.6, top_k=1).tolist() == [[False, True, True, False, False, True]]
    # top_k=2: tokens 0, 1 of class 0, and both class-1 tokens (3, 5) stay
    assert exit_decision(logits, valid, 0.6, top_k=2).tolist() == [[False, False, True, False, False, False]]
    assert exit_decision(logits, valid, 0.6, top_k=0).tolist() == [[True, True, True, True, False, True]]
    # invalid tokens (padding, already exited) never exit
    valid[0, 2] = False
    assert exit_decision(logits, valid, 0.6, top_k=1).tolist() == [[False, True, False, False, False, True]]


def test_exit_reduction_pads_and_summarizes_per_class():
    # one prefix token; image 0: patches at positions 0..3, 1 and 2 exit (classes 0 and 1);
    # image 1: a padding token, an earlier summary of class 1 (size 2), patch 5 exits with class 1
    positions = torch.tensor([[0, 1, 2, 3], [5, 6, -1, -3]])
    sizes = torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 2]])
    exits = torch.tensor([[False, True, True, False], [True, False, False, False]])
    labels = torch.tensor([[0, 0, 1, 0], [1, 0, 0, 0]])
    x = torch.tensor([[10.0, 1, 2, 3, 4], [20, 5, 6, 99, 7]])[..., None]  # prefix, then the patch tokens
    dropped, out_positions = exit_reduction(positions, sizes, exits, labels, 2, 1, False, torch.float32)
    assert out_positions.tolist() == [[0, 3], [6, -1]]
    y, out_sizes = dropped.apply(x, torch.cat([torch.ones(2, 1), sizes], 1)[..., None])
    assert y[..., 0].tolist() == [[10, 1, 4], [20, 6, 0]] and out_sizes[..., 0].tolist() == [[1, 1, 1], [1, 1, 0]]
    kept, out_positions = exit_reduction(positions, sizes, exits, labels, 2, 1, True, torch.float32)
    assert out_positions.tolist() == [[0, 3, -2, -3], [6, -1, -2, -3]]
    y, out_sizes = kept.apply(x, torch.cat([torch.ones(2, 1), sizes], 1)[..., None])
    # class-0 summary of image 1 is empty (size 0); its class-1 summary is (2·7 + 1·5) / 3
    assert torch.allclose(y[..., 0], torch.tensor([[10, 1, 4, 2, 3], [20, 6, 0, 0, 19 / 3]]))
    assert out_sizes[..., 0].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 3]]
    # restore: an exited token that fed nothing keeps its value, a summarized one takes its summary's
    assert kept.restore(y + 100, fill=x)[0, :, 0].tolist() == [110, 101, 102, 103, 104]
    assert dropped.restore(dropped.apply(x, None)[0] + 100, fill=x)[0, :, 0].tolist() == [110, 101, 2, 3, 104]


def test_p0_one_is_bit_identical_to_the_unreduced_model():
    model, x = make_model(), images()
    with torch.no_grad():
        expected = model.forward_features(x)
        apply_dtop(model, p0=1.0)
        assert torch.equal(model.forward_features(x), expected)
    assert tokenreduce.applied_method(model).record.stage.eq(-1).all()


def test_p0_zero_lets_only_the_per_class_top_k_continue():
    model, x = make_model(), images()
    heads = make_heads(1)
    features = block_output(model, x, 1)[:, 1:]  # one prefix token
    with torch.no_grad():
        logits = heads[0](features.transpose(1, 2).reshape(4, 384, 7, 7)).flatten(2).transpose(1, 2)
    confidence, label = logits.softmax(-1).max(-1)
    apply_dtop(model, p0=0.0, top_k=2, exit_after=(1,), heads=heads)
    with torch.no_grad():
        model.forward_features(x)
    stayed = tokenreduce.applied_method(model).record.stage == -1
    for image in range(4):
        expected = set()
        for cls in label[image].unique():
            members = (label[image] == cls).nonzero().flatten()
            expected |= set(members[confidence[image, members].argsort(descending=True)[:2]].tolist())
        assert set(stayed[image].nonzero().flatten().tolist()) == expected
    # every image keeps the class token and its top-k; the batch is padded to the largest count
    assert tokenreduce.token_counts(model)[-1] == 1 + int(stayed.sum(1).max())


def test_exited_tokens_come_back_with_their_features_frozen_at_the_exit():
    model, x = make_model(), images()
    frozen = block_output(model, x, 1)
    apply_dtop(model, p0=0.5)
    with torch.no_grad():
        restored = model.forward_features(x)
    record = tokenreduce.applied_method(model).record
    first = record.stage == 0
    assert 0 < first.sum() < first.numel()
    # the model's final norm is applied to every position after the restore
    assert torch.allclose(restored[:, 1:][first], model.norm(frozen[:, 1:])[first], atol=1e-6)
    stayed = record.stage == -1
    assert not torch.allclose(restored[:, 1:][stayed], model.norm(frozen[:, 1:])[stayed], atol=1e-3)


@pytest.mark.parametrize("summarize", [False, True])
def test_batched_equals_one_image_at_a_time(summarize):
    model, x = make_model(), images()
    apply_dtop(model, p0=0.7, summarize=summarize)
    method = tokenreduce.applied_method(model)
    with torch.no_grad():
        batched = model.forward_features(x)
        record = method.record
        assert len(set(record.stage.eq(-1).sum(1).tolist())) > 1  # images keep different counts: padding
        for i in range(x.shape[0]):
            alone = model.forward_features(x[i:i + 1])
            assert torch.allclose(alone[0], batched[i], atol=1e-5)
            assert torch.equal(method.record.stage[0], record.stage[i])
            assert torch.allclose(method.record.logits[0], record.logits[i], atol=1e-5)


def test_flops_fall_as_p0_falls():
    model, x = make_model(), images(2)
    full = count_flops_per_image(model, x)
    previous = full
    for p0 in (1.0, 0.9, 0.6, 0.0):
        apply_dtop(model, p0=p0)
        flops = count_flops_per_image(model, x)
        assert all(now <= before for now, before in zip(flops, previous))
        previous = flops
    assert all(now < 0.8 * before for now, before in zip(previous, full))


def test_combine_takes_frozen_logits_where_tokens_exited():
    record = ExitRecord(logits=torch.tensor([[[1.0, 2.0], [0.0, 0.0], [5.0, 6.0], [0.0, 0.0]]]),
                        stage=torch.tensor([[0, -1, 1, -1]]))
    final = torch.full((1, 2, 2, 2), -1.0)
    combined = ExitRecord.combine(record, final)
    assert combined[0, :, 0, 0].tolist() == [1.0, 2.0] and combined[0, :, 1, 0].tolist() == [5.0, 6.0]
    assert combined[0, :, 0, 1].tolist() == [-1.0, -1.0] and combined[0, :, 1, 1].tolist() == [-1.0, -1.0]
    with pytest.raises(ValueError, match="do not match"):
        record.combine(torch.zeros(1, 3, 2, 2))


@pytest.mark.parametrize("options, message", [
    (dict(p0=1.5), "p0=1.5 is out of range"),
    (dict(heads=None), "must be a sequence of modules"),
    (dict(heads="heads.pt"), "must be a sequence of modules"),
    (dict(exit_after=(1,)), "give one head per exit block"),
    (dict(exit_after=(1, 5)), r"out of range 0..4"),
    (dict(top_k=-1), "top_k=-1 is out of range"),
])
def test_bad_options_are_refused_by_name(options, message):
    with pytest.raises(ValueError, match=message):
        tokenreduce.apply(make_model(), "dtop", **{"exit_after": (1, 3), "heads": make_heads(), **options})
