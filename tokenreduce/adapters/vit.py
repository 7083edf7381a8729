"""Adapter for timm's ``VisionTransformer`` family (ViT, DeiT, DINOv2, registers...).

Written against the installed timm's ``Block`` and ``Attention``: the adapter
swaps the class of the model and of each block for a subclass that adds token
reduction, so parameters, buffers and state-dict keys never change, and
``remove`` swaps the original classes back. Blocks where the method does
nothing call timm's own attention (with log(size) as an additive mask when
tokens carry sizes), so an inactive method is bit-identical to timm.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn
from torch.autograd import profiler as _profiler

from ..attention import AttentionMaps
from ..methods.base import ATTENTION_NEEDS, BlockTensors, Method, Need
from ..state import Restore, ReductionState

_ATTR = "_tokenreduce"
REDUCE_RANGE = "tokenreduce.reduce"  # profiler range: the method scores tokens and builds its Reduction
APPLY_RANGE = "tokenreduce.apply"  # profiler range: the Reduction moves tokens and sizes (gather / index_add)
# Logits and probabilities an AttentionMaps holds at once, per element of the block's q [B, H, N, D]:
# half the MLP's hidden activations at timm's mlp_ratio 4, so the block's peak stays the MLP's.
CHUNK_ELEMENTS = 2


def _profiled(name: str) -> contextlib.AbstractContextManager:
    """A ``torch.profiler`` range while a profiler runs, else nothing: no per-call
    cost in normal runs and nothing for torch.compile to trace."""
    return torch.profiler.record_function(name) if _profiler._is_profiler_enabled else contextlib.nullcontext()


def _attention_bias(state: ReductionState, method: Method, like: Tensor) -> Optional[Tensor]:
    """log(size) per key as a float mask [B, 1, 1, N] for proportional attention."""
    if state.sizes is None or not method.proportional_attention:
        return None
    dtype = torch.get_autocast_dtype(like.device.type) if torch.is_autocast_enabled(like.device.type) else like.dtype
    return state.sizes.log().to(dtype)[:, None, None, :, 0]


def project(attn: nn.Module, x: Tensor, parts: str = "qkv") -> Tensor:
    """The rows of a timm attention's fused qkv projection (``Attention``, Swin's
    ``WindowAttention``) for ``parts`` (a run of "qkv"): [B, N, len(parts)·attn_dim]
    from one matmul, so q/k and v can be projected from different token sets
    (MCTF: q, k before merging, v after)."""
    if parts not in ("qkv", "qk", "kv", "q", "k", "v"):
        raise ValueError(f"parts={parts!r} must be a contiguous run of 'qkv'")
    if parts == "qkv":
        return attn.qkv(x)
    attn_dim = attn.qkv.out_features // 3
    start = "qkv".index(parts) * attn_dim
    rows = slice(start, start + len(parts) * attn_dim)
    bias = None if attn.qkv.bias is None else attn.qkv.bias[rows]
    return F.linear(x, attn.qkv.weight[rows], bias)


def split_heads(attn: nn.Module, projected: Tensor, parts: str) -> list[Tensor]:
    """[B, N, len(parts)·attn_dim] → one [B, H, N, D] per letter; q and k normed
    where the attention has ``q_norm`` / ``k_norm``."""
    batch, num_tokens, _ = projected.shape
    heads = projected.reshape(batch, num_tokens, len(parts), attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    norms = {"q": getattr(attn, "q_norm", None), "k": getattr(attn, "k_norm", None), "v": None}
    return [h if norms[p] is None else norms[p](h) for p, h in zip(parts, heads.unbind(0))]


def attention_probabilities(attn: Attention, q: Tensor, k: Tensor, bias: Optional[Tensor],
                            in_place: bool = False) -> Tensor:
    """softmax(q·kᵀ·scale + bias) [B, H, N, N].

    ``in_place`` (only honoured without autograd) normalises the logits buffer
    itself: on CPU a fresh B·H·N² buffer costs more in page faults than the
    softmax (equal to ``softmax`` within float rounding, ~1e-7)."""
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    if bias is not None:
        logits += bias  # in place: one N×N pass less (matmul's backward does not need its output)
    if not in_place or (torch.is_grad_enabled() and logits.requires_grad):
        return logits.softmax(dim=-1)
    logits -= logits.amax(dim=-1, keepdim=True)
    logits.exp_()
    logits /= logits.sum(dim=-1, keepdim=True)
    return logits


def attention_gate(attn: Attention, x: Tensor) -> Optional[Tensor]:
    return attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None


def merge_heads(out: Tensor) -> Tensor:
    """[B, H, N, D] → [B, N, H·D]."""
    batch, _, num_tokens, _ = out.shape
    return out.transpose(1, 2).reshape(batch, num_tokens, -1)


def finish_attention(attn: Attention, out: Tensor, gate: Optional[Tensor]) -> Tensor:
    """timm's tail after the heads are merged ([B, N, attn_dim]): norm, gate, proj."""
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


def _extras(attn: Attention, q: Tensor, k: Tensor, bias: Optional[Tensor], need: Need, in_place: bool = False) -> dict:
    """What ``need`` asks for, from q and k; the N×N map only for ``Need.ATTENTION``
    (otherwise the class-token row alone, q_cls·Kᵀ, and received attention or
    attention maps in bounded pieces). Token importance is the class-token row
    averaged over heads."""
    extras: dict = {}
    if Need.IMPORTANCE in need:
        need = need | Need.CLS_ATTENTION
    if Need.KEYS in need:
        extras["keys"] = k
    if Need.ATTENTION in need:
        extras["attention"] = attention_probabilities(attn, q, k, bias, in_place)
        if Need.CLS_ATTENTION in need:
            extras["cls_attention"] = extras["attention"][:, :, 0]
    elif Need.CLS_ATTENTION in need:
        extras["cls_attention"] = attention_probabilities(attn, q[:, :, :1], k, bias)[:, :, 0]
    if Need.IMPORTANCE in need:
        extras["importance"] = extras["cls_attention"].mean(dim=1)
    if need & (Need.RECEIVED_ATTENTION | Need.ATTENTION_MAPS):
        maps = AttentionMaps(q, k, attn.scale, bias, max_elements=CHUNK_ELEMENTS * q.numel())
        if Need.RECEIVED_ATTENTION in need:
            extras["received_attention"] = maps.received()
        if Need.ATTENTION_MAPS in need:
            extras["attention_maps"] = maps
    return extras


def _attend(attn: Attention, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], probs: Optional[Tensor]) -> Tensor:
    """Heads output [B, H, N, D]: from explicit probabilities when they exist, else SDPA."""
    if probs is not None:
        return attn.attn_drop(probs) @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=attn.attn_drop.p if attn.training else 0.0)


def attention_with_extras(attn: Attention, x: Tensor, bias: Optional[Tensor], need: Need) -> tuple[Tensor, dict]:
    """timm ``Attention.forward`` that also returns what a method needs.

    Explicit probabilities are formed only for ``Need.ATTENTION``; otherwise the
    output comes from SDPA, the class-token row, if needed, is computed alone
    (q_cls·Kᵀ), and received attention or attention maps in bounded pieces
    (``AttentionMaps``), never the N×N map.
    """
    gate = attention_gate(attn, x)
    q, k, v = split_heads(attn, project(attn, x), "qkv")
    extras = _extras(attn, q, k, bias, need, in_place=True)
    out = _attend(attn, q, k, v, bias, extras.get("attention"))
    return finish_attention(attn, merge_heads(out), gate), extras


def reduce_then_attend(block: Block, x: Tensor, state: ReductionState, method: Method, index: int, need: Need) -> Tensor:
    """Stage "before_attention": the method reduces the block input ``x`` from
    this block's attention on the unreduced tokens; returns the reduced ``x``
    plus the attention residual computed for the reduced tokens.

    With ``method.one_step_ahead`` the attention of the reduced tokens is the
    unreduced map merged through the reduction (``merge_attention``), applied as
    P · spread(v') with v' the values of the reduced tokens, then query rows
    combined like the tokens: P · spread(v') is attention over the unreduced
    keys with values spread(v'), so fused attention (SDPA) computes it and
    neither P nor the merged M×M map is ever formed. Otherwise what the method
    read only feeds its (gradient-free) decisions and attention is recomputed
    exactly on the reduced tokens (timm's attention, SDPA).
    """
    attn = block.attn
    reuse = method.one_step_ahead
    normed = block.norm1(x)
    bias = _attention_bias(state, method, x)
    extras: dict = {}
    if need & ATTENTION_NEEDS:  # Need.TOKENS alone: no q, k projected for the method
        with torch.set_grad_enabled(torch.is_grad_enabled() and reuse):
            q, k = split_heads(attn, project(attn, normed, "qk"), "qk")
            extras = _extras(attn, q, k, bias, need, in_place=True)
    with _profiled(REDUCE_RANGE):
        reduction = method.reduce(BlockTensors(index, x, state.sizes, method.num_prefix_tokens,
                                               grid=state.grid, **extras))
    if reduction is None:
        if not reuse:
            return x + block.drop_path1(block.ls1(attn(normed, attn_mask=bias)))
        (v,) = split_heads(attn, project(attn, normed, "v"), "v")
        out = merge_heads(_attend(attn, q, k, v, bias, extras.get("attention")))
        return x + block.drop_path1(block.ls1(finish_attention(attn, out, attention_gate(attn, normed))))
    sizes = state.sizes
    with _profiled(APPLY_RANGE):
        x = state.apply(reduction, x)
    normed = block.norm1(x)
    if not reuse:
        attn_out = attn(normed, attn_mask=_attention_bias(state, method, x))
        return x + block.drop_path1(block.ls1(attn_out))
    values = reduction.spread(project(attn, normed, "v"), num_in=q.shape[2])
    (values,) = split_heads(attn, values, "v")
    out = reduction.apply(merge_heads(_attend(attn, q, k, values, bias, extras.get("attention"))), sizes)[0]
    return x + block.drop_path1(block.ls1(finish_attention(attn, out, attention_gate(attn, normed))))


def attend_then_reduce(block: Block, x: Tensor, state: ReductionState, method: Method, index: int,
                       need: Optional[Need]) -> Tensor:
    """The attention residual, then (stage "after_attention") the method's reduction.

    A function of its own so that the keys and attention maps it gathered are
    freed before the MLP runs, not held through the block's peak of memory."""
    bias = _attention_bias(state, method, x)
    if need is None or need == Need.NOTHING:
        attn_out, extras = block.attn(block.norm1(x), attn_mask=bias), {}
    else:
        attn_out, extras = attention_with_extras(block.attn, block.norm1(x), bias, need)
    x = x + block.drop_path1(block.ls1(attn_out))
    del attn_out  # not held while the method reads the attention
    if need is None or method.stage != "after_attention":
        return x
    with _profiled(REDUCE_RANGE):
        reduction = method.reduce(BlockTensors(index, x, state.sizes, method.num_prefix_tokens,
                                               grid=state.grid, **extras))
    if reduction is None:
        return x
    with _profiled(APPLY_RANGE):
        return state.apply(reduction, x)


class _Patch:
    """Per-model record shared by the patched model and its blocks."""

    def __init__(self, method: Method, trace_source: bool, restore: Optional[Restore] = None) -> None:
        self.method = method
        self.needs = [method.needs(i) for i in range(method.num_blocks)]
        self.restore = restore
        self.state = ReductionState(trace_source=trace_source, restore_form=restore and restore.form)

    def restores_after(self, index: int) -> bool:
        """Whether tokens come back to the full grid at the end of block ``index``."""
        if self.restore is None:
            return False
        return self.restore.at == "block" or index == self.method.num_blocks - 1


class ReducingBlock:
    """Mixin over timm ``Block``: the method's reduction after the attention
    residual (stage "after_attention") or of the block input, with this block's
    attention computed for the reduced tokens (stage "before_attention")."""

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("token reduction cannot follow a user attn_mask / is_causal: the token count changes")
        patch: _Patch = getattr(self, _ATTR)
        index: int = self._tokenreduce_index
        need = patch.needs[index]
        state, method = patch.state, patch.method
        if index == 0:
            state.record_tokens(x)
        if method.stage == "before_attention" and need:
            x = reduce_then_attend(self, x, state, method, index, need)
        else:
            x = attend_then_reduce(self, x, state, method, index, need)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        state.record_tokens(x)
        if patch.restores_after(index):
            x = state.restore(x)
        return x


def _token_grid(model: VisionTransformer, images: Tensor) -> tuple[int, int]:
    """The patch-token grid (rows, cols) for ``images``, as Python ints (also while tracing)."""
    rows, cols = model.patch_embed.dynamic_feat_size(images.shape[-2:])
    return int(rows), int(cols)


class ReducingVisionTransformer:
    """Mixin over timm ``VisionTransformer``: resets the reduction state per
    forward and pools with size weights."""

    def forward_features(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        getattr(self, _ATTR).state.reset(_token_grid(self, x))
        return super().forward_features(x, attn_mask=attn_mask, is_causal=is_causal)

    def forward_intermediates(
        self,
        x: Tensor,
        indices: Optional[Union[int, list[int]]] = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
        attn_mask: Optional[Tensor] = None,
        is_causal: bool = False,
    ):
        """timm's ``forward_intermediates`` in restore mode: every intermediate is
        brought back to the full token grid (through the reductions made so far)."""
        patch: _Patch = getattr(self, _ATTR)
        if patch.restore is None:
            raise NotImplementedError(
                "forward_intermediates needs the full token grid: apply the method with mode='restore' "
                "(or call tokenreduce.remove(model) first)"
            )
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt={output_fmt!r} must be 'NCHW' or 'NLC'")
        if attn_mask is not None or is_causal:
            raise ValueError("token reduction cannot follow a user attn_mask / is_causal: the token count changes")
        grid = _token_grid(self, x)
        patch.state.reset(grid)
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        batch = x.shape[0]
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        intermediates = []
        for i, block in enumerate(self.blocks[: max_index + 1] if stop_early else self.blocks):
            x = block(x)
            if i in take_indices:
                full = patch.state.restored(x)
                intermediates.append(self.norm(full) if norm else full)
        x = patch.state.restore(x)  # stopped early: the final tokens come back too
        prefix = self.num_prefix_tokens
        prefix_tokens = [y[:, :prefix] for y in intermediates] if prefix else None
        intermediates = [y[:, prefix:] for y in intermediates]
        if output_fmt == "NCHW":
            intermediates = [y.reshape(batch, *grid, -1).permute(0, 3, 1, 2).contiguous()
                             for y in intermediates]
        if output_dict:
            result = {"image_intermediates": intermediates}
            if prefix_tokens is not None and return_prefix_tokens:
                result["image_intermediates_prefix"] = prefix_tokens
            if not intermediates_only:
                result["image_features"] = self.norm(x)
            return result
        if return_prefix_tokens and prefix_tokens is not None:
            intermediates = list(zip(intermediates, prefix_tokens))
        return intermediates if intermediates_only else (self.norm(x), intermediates)

    def pool(self, x: Tensor, pool_type: Optional[str] = None) -> Tensor:
        sizes = getattr(self, _ATTR).state.sizes
        pool_type = self.global_pool if pool_type is None else pool_type
        if sizes is None or self.attn_pool is not None or pool_type not in ("avg", "avgmax"):
            return super().pool(x, pool_type)
        if not getattr(self, "pool_include_prefix", False):
            x, sizes = x[:, self.num_prefix_tokens:], sizes[:, self.num_prefix_tokens:]
        weights = sizes.to(x.dtype)
        mean = (x * weights).sum(dim=1) / weights.sum(dim=1)
        return mean if pool_type == "avg" else 0.5 * (x.amax(dim=1) + mean)


_SUBCLASSES: dict[tuple[type, type], type] = {}


def _subclass(base: type, mixin: type) -> type:
    """``mixin`` on top of the concrete timm class (e.g. DeiT distilled), made once.

    The class is made at run time, so pickle cannot find it by name: its
    instances pickle as (base, mixin) plus their state (``_reduce_patched``), and
    unpickling makes the same subclass again, so ``torch.save(model)`` /
    ``torch.load`` and ``copy.deepcopy`` keep the reduction."""
    if (base, mixin) not in _SUBCLASSES:
        _SUBCLASSES[(base, mixin)] = type(f"Reducing{base.__name__}", (mixin, base),
                                          {"__reduce_ex__": _reduce_patched})
    return _SUBCLASSES[(base, mixin)]


def _new_patched(base: type, mixin: type) -> nn.Module:
    """An empty instance of the reducing subclass of ``base`` (unpickling fills its state)."""
    cls = _subclass(base, mixin)
    return cls.__new__(cls)


def _reduce_patched(self: nn.Module, protocol: int) -> tuple:
    mixin, base = type(self).__bases__
    return (_new_patched, (base, mixin)) + tuple(object.__reduce_ex__(self, protocol)[2:])


def _restore_class(module: nn.Module) -> None:
    module.__class__ = type(module).__bases__[1]


def is_supported(model: nn.Module) -> bool:
    return isinstance(model, VisionTransformer)


def num_blocks(model: VisionTransformer) -> int:
    return len(model.blocks)


def num_prefix_tokens(model: VisionTransformer) -> int:
    return model.num_prefix_tokens


def check_model(model: VisionTransformer, method: Method) -> None:
    """Refuse models this adapter would run wrongly, naming the reason."""
    for i, block in enumerate(model.blocks):
        if type(block) is not Block:
            raise ValueError(
                f"block {i} is {type(block).__name__}; the timm ViT adapter supports timm.models.vision_transformer.Block"
            )
        if type(block.attn) is not Attention:
            raise ValueError(
                f"block {i} attention is {type(block.attn).__name__}; the timm ViT adapter supports timm.layers.Attention"
            )
    if model.attn_pool is not None:
        raise ValueError(f"global_pool={model.global_pool!r} (attention pooling) is not supported with token reduction")
    needs_importance = any(Need.IMPORTANCE in method.needs(i) for i in range(method.num_blocks))
    if (method.requires_class_token or needs_importance) and model.cls_token is None:
        raise ValueError(f"method {method.name!r} needs a class token, but this model has class_token=False")
    if method.scan_alignment:
        raise ValueError(f"method {method.name!r} with align=True aligns a state-space scan, but a ViT has no scan: "
                         "pass align=False")


def patch_classes(model: nn.Module, blocks: Sequence[nn.Module], patch: object, model_mixin: type,
                  block_mixin: type) -> None:
    """Swap the classes of ``model`` and its ``blocks`` for reducing subclasses that
    share ``patch``; parameters and state-dict keys stay as they are."""
    setattr(model, _ATTR, patch)
    model.__class__ = _subclass(type(model), model_mixin)
    for i, block in enumerate(blocks):
        setattr(block, _ATTR, patch)
        block._tokenreduce_index = i
        block.__class__ = _subclass(type(block), block_mixin)


def unpatch_classes(model: nn.Module, blocks: Sequence[nn.Module]) -> None:
    """Undo ``patch_classes``: the original classes, no added attributes."""
    for block in blocks:
        _restore_class(block)
        del block._tokenreduce_index
        delattr(block, _ATTR)
    _restore_class(model)
    delattr(model, _ATTR)


def install(model: VisionTransformer, method: Method, trace_source: bool, restore: Optional[Restore] = None) -> None:
    patch_classes(model, model.blocks, _Patch(method, trace_source, restore), ReducingVisionTransformer, ReducingBlock)


def uninstall(model: VisionTransformer) -> None:
    unpatch_classes(model, model.blocks)


def state_of(model: nn.Module) -> Optional[ReductionState]:
    patch = getattr(model, _ATTR, None)
    return None if patch is None else patch.state


def method_of(model: nn.Module) -> Optional[Method]:
    patch = getattr(model, _ATTR, None)
    return None if patch is None else patch.method
