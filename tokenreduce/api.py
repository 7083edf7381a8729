"""The user-facing calls: apply, remove, token_counts, source_map, source_maps."""
from __future__ import annotations

from typing import Any, Optional, Union

from torch import Tensor, nn

from .adapters import ADAPTERS, adapter_for
from .methods.base import build_options, get_method_class
from .state import Restore

MODES = ("reduce", "restore")


WRAPPERS = (nn.DataParallel, nn.parallel.DistributedDataParallel)


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside ``nn.DataParallel`` / ``DistributedDataParallel`` (the
    reduction patches the module the wrapper runs; the wrapper is left as it is).

    DataParallel over several devices copies the module into one replica per
    device and runs them in threads that would share one reduction state (the
    token sizes of the forward in progress): refused, use DistributedDataParallel."""
    while isinstance(model, WRAPPERS):
        if isinstance(model, nn.DataParallel) and len(model.device_ids) > 1:
            raise ValueError(
                f"nn.DataParallel over devices {model.device_ids} is not supported: its replicas run in threads "
                "sharing one reduction state; use DistributedDataParallel (torchrun, one process per device) "
                "or apply to the module before wrapping it for one device"
            )
        model = model.module
    return model


def _adapter_holding(model: nn.Module):
    model = _unwrap(model)
    for adapter in ADAPTERS:
        if adapter.is_supported(model) and adapter.method_of(model) is not None:
            return adapter
    return None


_INPUT_SIZE = "_tokenreduce_input_size"  # (image size, parameters and buffers) from before apply(img_size=...)


def apply(model: nn.Module, method: str, *, mode: str = "reduce", restore_at: str = "end",
          restore_form: str = "residual", trace_source: bool = False,
          img_size: Optional[Union[int, tuple[int, int]]] = None, **options: Any) -> nn.Module:
    """Patch ``model`` in place with ``method`` (re-applying replaces it); returns the model.
    A ``DataParallel`` / ``DistributedDataParallel`` wrapper is seen through: the
    module it wraps is patched (the torchrun training path).

    ``options`` are the method's (see ``available_methods()``); ``trace_source``
    keeps the map of which input tokens each token covers (``source_map``).

    ``mode="restore"`` gives every original token position a token again, for
    dense prediction: ``forward_features`` and ``forward_intermediates`` return
    the full grid. ``restore_at``: ``"end"`` (after the last block) or
    ``"block"`` (at the end of each block, as tomesd). ``restore_form``:
    ``"residual"`` (a position keeps its own value at the reduction plus what the
    token it went into gained afterwards) or ``"copy"`` (it takes that token's
    output); pruned tokens keep their value at the reduction either way, and a
    method's own reconstruction (``cluster``: W·y) is used in both forms.
    Residual is the default: on random-weight ViT-S features it keeps 0.99 patch
    cosine to the unreduced model where copy keeps 0.91 (ToMe r=8, 4 blocks: 0.985 vs 0.908).

    ``img_size`` (int or (height, width)) also sets the input resolution, a lever
    that composes with every method (``tokenreduce.plan`` picks it): timm's
    ``set_input_size`` resamples the position embeddings (bicubic, as
    ``dynamic_img_size`` does per forward) and FLOP counts follow; ``remove``
    puts the original size and position embedding back.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} must be one of {MODES}")
    size = _checked_img_size(img_size)
    restore = Restore(restore_at, restore_form) if mode == "restore" else None
    wrapper, model = model, _unwrap(model)
    adapter = adapter_for(model)
    method_cls = get_method_class(method)
    built = method_cls(
        build_options(method_cls, options),
        num_blocks=adapter.num_blocks(model),
        num_prefix_tokens=adapter.num_prefix_tokens(model),
    )
    remove(model)
    if size is not None:
        _set_input_size(model, size)
    try:
        adapter.check_model(model, built)
    except ValueError:
        _restore_input_size(model)
        raise
    adapter.install(model, built, trace_source=trace_source, restore=restore)
    return wrapper


def _checked_img_size(img_size: Any) -> Optional[tuple[int, int]]:
    if img_size is None:
        return None
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
        raise ValueError(f"img_size={img_size!r} must be a positive int or (height, width)")
    return size


def _set_input_size(model: nn.Module, size: tuple[int, int]) -> None:
    if not hasattr(model, "set_input_size") or not hasattr(model, "patch_embed"):
        raise ValueError(f"img_size: {type(model).__name__} cannot change its input size (timm's set_input_size)")
    patch = tuple(model.patch_embed.patch_size)
    if size[0] % patch[0] or size[1] % patch[1]:
        raise ValueError(f"img_size={size} must be a multiple of the patch size {patch}")
    tensors = {(module, name): tensor for module in model.modules()
               for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]}
    setattr(model, _INPUT_SIZE, (tuple(model.patch_embed.img_size), tensors))
    model.set_input_size(img_size=size)


def _restore_input_size(model: nn.Module) -> None:
    saved = getattr(model, _INPUT_SIZE, None)
    if saved is None:
        return
    size, tensors = saved
    model.set_input_size(img_size=size)
    for (module, name), tensor in tensors.items():  # the originals, not resamplings of the resampled ones
        if isinstance(tensor, nn.Parameter):
            setattr(module, name, tensor)
        else:
            module.register_buffer(name, tensor, persistent=name not in module._non_persistent_buffers_set)
    delattr(model, _INPUT_SIZE)


def remove(model: nn.Module) -> nn.Module:
    """Undo ``apply``: the original classes and attributes (and input size), outputs bit-identical."""
    adapter = _adapter_holding(model)
    if adapter is not None:
        adapter.uninstall(_unwrap(model))
    _restore_input_size(_unwrap(model))
    return model


def _state(model: nn.Module):
    adapter = _adapter_holding(model)
    if adapter is None:
        raise ValueError("this model has no token reduction applied; call tokenreduce.apply(model, ...) first")
    return adapter.state_of(_unwrap(model))


def token_counts(model: nn.Module) -> list[int]:
    """Tokens entering block 0, then after each block, in the last forward."""
    return list(_state(model).token_counts)


def source_map(model: nn.Module) -> Optional[Tensor]:
    """[B, N, N0] map of the input tokens each output token covers (last forward),
    or None when nothing was reduced. Needs ``apply(..., trace_source=True)``."""
    state = _state(model)
    if not state.trace_source:
        raise ValueError("source tracing is off; apply the method with trace_source=True")
    return state.source


def source_maps(model: nn.Module) -> list[tuple[int, Tensor]]:
    """``(block index, [B, M, N0] source map)`` after each block that reduced tokens
    in the last forward, in order (the last one is ``source_map``). Needs
    ``apply(..., trace_source=True)``; empty when nothing was reduced."""
    state = _state(model)
    if not state.trace_source:
        raise ValueError("source tracing is off; apply the method with trace_source=True")
    return list(state.source_history)


def applied_method(model: nn.Module):
    """The method instance patched into ``model`` (None when unpatched)."""
    adapter = _adapter_holding(model)
    return None if adapter is None else adapter.method_of(_unwrap(model))
