"""Deployment: every method exports (ONNX with either exporter, torch.export) with a
dynamic batch and reproduces eager at another batch size; whole patched models
pickle; wrapped models (DataParallel, DistributedDataParallel) take a method."""
import copy
import importlib.util
import io

import pytest
import timm
import torch
from torch import nn

import tokenreduce
from tokenreduce.adapters import vit as vit_adapter
from tokenreduce.exporting import ExportError, export_model, load_exported

from conftest import load_tool

# settings that reduce a 4-block ViT at 112 px (49 patch tokens)
SETTINGS = {
    "cluster": dict(location=0, grid=0.5),
    "tome": dict(r=8),
    "evit": dict(keep_rate=0.7, locations=(1, 2)),
    "mctf": dict(r=8),
    "zero_tprune": dict(locations=(1, 2)),
    "token_transforming": dict(blocks=(1, 2)),
    "top_vim": dict(locations=(1,), align=False),  # on a ViT: class attention, no scan to align
}
NOT_EXPORTABLE = {"dtop"}  # refused at export time: test_dtop_refuses_every_exporter
HAS_ONNXSCRIPT = importlib.util.find_spec("onnxscript") is not None
EXPORTERS = [
    "onnx",
    pytest.param("onnx-dynamo", marks=pytest.mark.skipif(not HAS_ONNXSCRIPT, reason="needs onnxscript")),
    "torch-export",
]
SUFFIX = {"onnx": ".onnx", "onnx-dynamo": ".onnx", "torch-export": ".pt2"}


def small_vit(method=None, **apply_options) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", depth=4, img_size=112).eval()
    if method is not None:
        tokenreduce.apply(model, method, **SETTINGS[method], **apply_options)
    return model


def images(batch: int, size: int = 112) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))


class Features(nn.Module):
    """``forward_features`` as the module's forward (restore mode: the full token grid)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


def assert_export_matches_eager(model: nn.Module, exporter: str, path) -> None:
    """Traced at batch 2; the reloaded export equals eager at batch 2 and 3."""
    export_model(model, images(2), path, exporter)
    run = load_exported(path)
    for batch in (2, 3):
        with torch.no_grad():
            expected = model(images(batch))
        torch.testing.assert_close(run(images(batch)), expected, atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("method", sorted(SETTINGS))
def test_export_reproduces_eager_at_another_batch_size(method, exporter, tmp_path):
    assert set(SETTINGS) | NOT_EXPORTABLE == set(tokenreduce.available_methods())
    model = small_vit(method)
    with torch.no_grad():
        model(images(2))
    counts = tokenreduce.token_counts(model)
    assert counts[-1] < counts[0]  # the setting reduces
    assert_export_matches_eager(model, exporter, tmp_path / f"model{SUFFIX[exporter]}")


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_dtop_refuses_every_exporter(exporter, tmp_path):
    """The tokens that go on depend on the data: no graph with one token count is written."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", depth=4, img_size=112).eval()
    heads = [nn.Conv2d(192, 3, 1) for _ in range(2)]
    tokenreduce.apply(model, "dtop", exit_after=(1, 2), heads=heads, p0=0.5)
    with pytest.raises(ExportError, match="dtop cannot be exported"):
        export_model(model, images(2), tmp_path / f"dtop{SUFFIX[exporter]}", exporter)
    assert tokenreduce.count_flops(model, (3, 112, 112)) > 0  # FLOP counting traces too, and still works


def test_onnx_export_of_tome_reproduces_eager(tmp_path):
    # the case that was silently wrong: repeated rows of index_add (merges) dropped by the exporter
    assert_export_matches_eager(small_vit("tome"), "onnx", tmp_path / "tome.onnx")


@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["onnx", "torch-export"])
@pytest.mark.parametrize("method", ["tome", "cluster"])
def test_restore_mode_exports_the_full_grid(method, exporter, tmp_path):
    model = Features(small_vit(method, mode="restore")).eval()
    with torch.no_grad():
        assert model(images(2)).shape[1] == 50  # class token + 7×7 patches back
    assert_export_matches_eager(model, exporter, tmp_path / f"features{SUFFIX[exporter]}")


def test_swin_with_padded_windows_refuses_onnx_export(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", embed_dim=16, depths=(2, 2), num_heads=(1, 2),
                              img_size=200, strict_img_size=False).eval()
    tokenreduce.apply(model, "tome", ratio=0.4)
    with pytest.raises(ExportError, match="padded"):
        export_model(model, images(2, 200), tmp_path / "swin.onnx", "onnx")


@pytest.mark.slow
def test_swin_without_padding_exports_exactly(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", embed_dim=16, depths=(2, 2), num_heads=(1, 2)).eval()
    tokenreduce.apply(model, "tome", ratio=0.4)
    export_model(model, images(2, 224), tmp_path / "swin.onnx", "onnx")
    run = load_exported(tmp_path / "swin.onnx")
    with torch.no_grad():
        torch.testing.assert_close(run(images(3, 224)), model(images(3, 224)), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_vim_torch_export_reproduces_eager(tmp_path):
    model = make_vim()
    tokenreduce.apply(model, "top_vim", locations=(1,))
    export_model(model, images(2, 64), tmp_path / "vim.pt2", "torch-export")
    run = load_exported(tmp_path / "vim.pt2")
    with torch.no_grad():
        torch.testing.assert_close(run(images(3, 64)), model(images(3, 64)), atol=1e-4, rtol=0)
    assert tokenreduce.token_counts(model)[-1] < tokenreduce.token_counts(model)[0]


def test_export_rejects_a_mismatched_file_name(tmp_path):
    with pytest.raises(ValueError, match="writes a .pt2 file"):
        export_model(small_vit(), images(1), tmp_path / "model.onnx", "torch-export")
    with pytest.raises(ValueError, match="exporter='tensorrt'"):
        export_model(small_vit(), images(1), tmp_path / "model.onnx", "tensorrt")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["tome", "mctf"])
def test_compiled_with_dynamic_batch_equals_eager(method):
    model = small_vit(method)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", dynamic=True)
    with torch.no_grad():
        for batch in (2, 3):
            torch.testing.assert_close(compiled(images(batch)), model(images(batch)), atol=1e-5, rtol=0)


def make_swin() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("swin_tiny_patch4_window7_224", embed_dim=16, depths=(2, 2), num_heads=(1, 2)).eval()


def make_vim() -> nn.Module:
    from conftest import make_vim as build

    return build()


PICKLE_CASES = {
    "vit": (lambda: small_vit(), "mctf", dict(r=8), 112),
    "vit_restore": (lambda: small_vit(), "tome", dict(r=8, mode="restore"), 112),
    "swin": (make_swin, "tome", dict(ratio=0.4), 224),
    "vim": (make_vim, "top_vim", dict(locations=(1,)), 64),
}


@pytest.mark.parametrize("case", sorted(PICKLE_CASES))
def test_whole_patched_model_saves_and_loads(case, monkeypatch):
    make, method, options, size = PICKLE_CASES[case]
    model = make()
    tokenreduce.apply(model, method, trace_source=True, **options)
    x = images(2, size)
    with torch.no_grad():
        expected = model(x)
    counts = tokenreduce.token_counts(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    monkeypatch.setattr(vit_adapter, "_SUBCLASSES", {})  # as in a fresh process: the classes are made again
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert tokenreduce.token_counts(loaded) == []  # the last forward's tensors are not saved
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    assert tokenreduce.token_counts(loaded) == counts and counts[-1] < counts[0]
    assert repr(tokenreduce.applied_method(loaded)) == repr(tokenreduce.applied_method(model))
    copied = copy.deepcopy(loaded)
    with torch.no_grad():
        assert torch.equal(copied(x), expected)
    tokenreduce.remove(loaded)  # the original classes come back
    assert type(loaded) is type(make())


def test_apply_sees_through_data_parallel():
    model = small_vit()
    with torch.no_grad():
        unreduced = model(images(2))
    wrapped = nn.DataParallel(model)  # on CPU: no device ids, the module runs as is
    assert tokenreduce.apply(wrapped, "tome", r=8) is wrapped
    with torch.no_grad():
        torch.testing.assert_close(wrapped(images(2)), small_vit("tome")(images(2)))
    assert tokenreduce.token_counts(wrapped)[-1] < 50 and tokenreduce.applied_method(wrapped).name == "tome"
    tokenreduce.remove(wrapped)
    with torch.no_grad():
        assert torch.equal(wrapped(images(2)), unreduced)


def test_apply_refuses_data_parallel_over_several_devices():
    wrapped = nn.DataParallel(small_vit())
    wrapped.device_ids = [0, 1]  # as on a 2-GPU machine
    with pytest.raises(ValueError, match="DistributedDataParallel"):
        tokenreduce.apply(wrapped, "tome", r=8)


def test_apply_sees_through_distributed_data_parallel(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        model = small_vit()
        model.train()
        wrapped = nn.parallel.DistributedDataParallel(model)
        tokenreduce.apply(wrapped, "mctf", r=8)
        loss = wrapped(images(2)).square().mean()
        loss.backward()  # DDP's gradient all-reduce runs on the reduced forward
        assert tokenreduce.token_counts(wrapped)[-1] < 50
        assert all(p.grad is not None for p in model.blocks.parameters())
        reference = small_vit("mctf").train()
        reference(images(2)).square().mean().backward()
        torch.testing.assert_close(model.head.weight.grad, reference.head.weight.grad)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_export_tool_checks_the_files_against_eager(tmp_path):
    tool = load_tool("export")
    if not tool.DEFAULT_DATA.is_dir():
        pytest.skip(f"needs the shared images at {tool.DEFAULT_DATA}")
    report = tool.main(["--model-arg", "depth=2", "--setting", "tome:r=8", "--limit", "3", "--batch-size", "3",
                        "--repeats", "1", "--output-dir", str(tmp_path), "--out", str(tmp_path / "export.md")])
    assert [(row["setting"], row["exporter"]) for row in report["rows"]] == [("none", "onnx"), ("tome(r=8)", "onnx")]
    for row in report["rows"]:
        assert row["max_abs_diff"] < 1e-4 and row["img_per_s"] > 0
        assert tool.Path(row["file"]).exists()
    assert report["rows"][1]["tokens"].startswith("197→189")
    assert "| tome(r=8) | onnx |" in (tmp_path / "export.md").read_text()


def test_export_tool_refuses_a_setting_the_model_cannot_take_before_exporting(tmp_path):
    with pytest.raises(ValueError, match="out of range"):  # top_vim's default blocks 4, 9, 14 on a 2-block ViT
        load_tool("export").main(["--model-arg", "depth=2", "--setting", "top_vim", "--output-dir", str(tmp_path)])
    assert not list(tmp_path.iterdir())


def test_export_tool_refuses_checking_at_the_traced_batch_size():
    with pytest.raises(SystemExit):
        load_tool("export").parse_args(["--batch-size", "2", "--trace-batch-size", "2"])
