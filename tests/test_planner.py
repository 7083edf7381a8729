"""The planner: budgets, candidates within them, the Pareto front, settings that round-trip."""
import json
import math
import random
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import tokenreduce
from tokenreduce import evaluation as ev
from tokenreduce import planner

REPO = Path(__file__).resolve().parents[1]
STAGES = (8, 12)


def tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", img_size=64, embed_dim=48, depth=4, num_heads=2,
                             num_classes=5).eval()


def random_images(count: int, size: int = 72) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


@pytest.fixture(scope="module")
def flops_plan():
    model = tiny_vit()
    images = random_images(12)
    labels = [i % 5 for i in range(12)]
    report = planner.plan(model, images, planner.Budget("flops", 0.5), labels=labels, sizes=[32, 48, 64],
                          families=["tome", "evit", "mctf"], stages=STAGES, finalists=2, speed_repeats=1,
                          speed_batch_size=2)
    return model, report


@pytest.mark.parametrize("kind, value", [("flops", 0), ("flops", 1.5), ("flops", -0.5), ("gflops", math.nan),
                                         ("speedup", math.inf), ("watts", 1.0), ("img_per_s", True),
                                         ("latency_ms", "10")])
def test_bad_budgets_raise(kind, value):
    with pytest.raises(ValueError, match=kind if kind == "watts" else "budget"):
        planner.Budget(kind, value)


def test_bad_arguments_raise():
    model, images = tiny_vit(), random_images(4)
    with pytest.raises(ValueError, match="Budget"):
        planner.plan(model, images, "0.5")
    with pytest.raises(ValueError, match="score"):
        planner.plan(model, images, planner.Budget("flops", 0.5), score="psnr")
    with pytest.raises(ValueError, match="labels"):
        planner.plan(model, images, planner.Budget("flops", 0.5), score="top1")
    with pytest.raises(ValueError, match="multiples of the patch size"):
        planner.plan(model, images, planner.Budget("flops", 0.5), sizes=[40, 64])
    with pytest.raises(ValueError, match="famil"):
        planner.plan(model, images, planner.Budget("flops", 0.5), families=["tome", "magic"])
    with pytest.raises(ValueError, match="no setting meets the budget"):
        planner.plan(model, images, planner.Budget("gflops", 1e-6), sizes=[64], families=["evit"], stages=(2, 4))


def test_budget_targets():
    assert planner.Budget("flops", 0.5).target_gflops(6.0) == 3.0
    assert planner.Budget("gflops", 2.5).target_gflops(6.0) == 2.5
    assert planner.Budget("speedup", 2).target_gflops(6.0) == 3.0
    assert planner.Budget("img_per_s", 20).target_gflops(6.0, baseline_img_per_s=10) == 3.0
    assert planner.Budget("latency_ms", 50).target_gflops(6.0, baseline_img_per_s=10) == 3.0  # 20 img/s


def test_every_ranked_setting_is_within_the_budget(flops_plan):
    model, report = flops_plan
    baseline = tokenreduce.count_flops(model, (3, 64, 64))
    assert report["baseline"]["gflops"] == pytest.approx(baseline)
    assert report["budget"]["target_gflops"] == pytest.approx(0.5 * baseline)
    assert len(report["ranked"]) >= 3
    for row in report["ranked"]:
        assert row["gflops"] <= 0.5 * baseline * (1 + 1e-9)
        rebuilt = planner.build(model, row["setting"], row["img_size"])
        assert tokenreduce.count_flops(rebuilt, (3, row["img_size"], row["img_size"])) == pytest.approx(row["gflops"])
    # the weakest setting within the budget: one step weaker is over it
    tome = [row for row in report["ranked"] if row["family"] == "tome"]
    for row in tome:
        weaker = planner.build(model, f"tome:r={row['options']['r'] - 1}", row["img_size"])
        assert tokenreduce.count_flops(weaker, (3, row["img_size"], row["img_size"])) > 0.5 * baseline


def test_successive_halving_and_the_best(flops_plan):
    _, report = flops_plan
    ranked = report["ranked"]
    best = report["best"]
    assert best == ranked[0]
    assert best["images"] == STAGES[-1]  # confirmed on every stage's images
    finalists = [row for row in ranked if row["images"] == STAGES[-1]]
    assert report["score"] == "heldout_agreement"  # the default with labels
    scores = [r["heldout_agreement"] for r in finalists]
    assert scores == sorted(scores, reverse=True)
    assert all(row["images"] in STAGES for row in ranked)
    assert best["speedup"] is not None and best["speedup"] > 0
    assert best["top1"] is not None and 0 <= best["top1"] <= 100
    assert -1 <= best["fidelity"] <= 1
    assert set(report["seconds"]) >= {"total", "total_cpu", "fidelity (successive halving)"}


def test_setting_round_trips_through_the_parser_and_apply(flops_plan):
    model, report = flops_plan
    best = report["best"]
    parsed = ev.parse_setting(json.loads(json.dumps(best))["setting"])
    ev.validate_setting(parsed, tokenreduce.available_methods())
    assert parsed.method == best["method"]
    assert parsed.options == {k: tuple(v) if isinstance(v, tuple) else v for k, v in best["options"].items()}
    assert planner.setting_text(parsed.method, parsed.options) == best["setting"]
    built = planner.build(model, best["setting"], best["img_size"])
    assert built.patch_embed.img_size == (best["img_size"],) * 2
    with torch.no_grad():
        out = built(torch.randn(2, 3, best["img_size"], best["img_size"]))
    assert out.shape == (2, 5)
    if parsed.reduces:
        assert tokenreduce.token_counts(built)[-1] < tokenreduce.token_counts(built)[0]


def test_setting_text_for_schedules_and_lists():
    text = planner.setting_text("tome", {"r": (6, -0.5)})
    assert text == "tome:r=(6,-0.5)"
    assert ev.parse_setting(text).options == {"r": (6, -0.5)}
    text = planner.setting_text("mctf", {"r": 3, "locations": [0, 1, 2]})
    assert ev.parse_setting(text).options == {"r": 3, "locations": [0, 1, 2]}


def test_pareto_front_matches_brute_force():
    rng = random.Random(1)
    points = [(rng.choice([1.0, 2.0, 3.0, 4.0]), rng.choice([0.1, 0.5, 0.9])) for _ in range(40)]
    front = planner.pareto_front(points)

    def dominated(i):
        return any(c <= points[i][0] and s >= points[i][1] and (c, s) != points[i] for c, s in points)

    expected = {i for i in range(len(points)) if not dominated(i)}
    assert {points[i] for i in front} == {points[i] for i in expected}
    assert len(front) == len({points[i] for i in expected})  # one index per distinct point
    assert planner.pareto_front([(1.0, 0.5), (2.0, 0.9), (3.0, 0.8), (0.5, 0.1)]) == [3, 0, 1]


def test_reported_pareto_is_the_front_of_the_ranked(flops_plan):
    _, report = flops_plan
    pareto = report["pareto"]
    assert pareto
    costs = [row["gflops"] for row in pareto]
    scores = [row["pareto_score"] for row in pareto]
    assert costs == sorted(costs) and scores == sorted(scores) and len(set(scores)) == len(scores)
    ranked_settings = {(row["setting"], row["img_size"]) for row in report["ranked"]}
    assert {(row["setting"], row["img_size"]) for row in pareto} <= ranked_settings


def test_heldout_probes_classify_each_image_with_a_probe_that_did_not_see_it():
    torch.manual_seed(0)
    labels = torch.arange(40) % 2
    features = torch.randn(40, 8) + 4.0 * labels[:, None].float()  # separable
    probes = planner.HeldOutProbes(features, labels, 2)
    assert (probes.classes(features) == labels).all()
    flipped = features.clone()
    flipped[:10] = features[:10] + 8.0 * (1 - 2 * labels[:10, None].float())  # move 10 across the boundary
    assert (probes.classes(flipped)[:10] != labels[:10]).all()
    assert len(probes.probes) == planner.HELDOUT_FOLDS


def test_plan_ranks_by_heldout_agreement():
    model, images = tiny_vit(), random_images(16)
    labels = [i % 2 for i in range(16)]
    report = planner.plan(model, images, planner.Budget("flops", 0.6), labels=labels, sizes=[48, 64],
                          families=["tome"], stages=(8, 16), finalists=1, score="heldout_agreement",
                          speed_repeats=1, speed_batch_size=2)
    finalists = [row for row in report["ranked"] if row["images"] == 16]
    assert all(0 <= row["heldout_agreement"] <= 100 for row in report["ranked"])
    assert [r["heldout_agreement"] for r in finalists] == sorted((r["heldout_agreement"] for r in finalists),
                                                                  reverse=True)
    with pytest.raises(ValueError, match="at least 8 images"):
        planner.plan(model, images, planner.Budget("flops", 0.6), labels=labels, stages=(4, 16),
                     score="heldout_agreement")


def test_cost_model_predicts_counted_flops():
    model = tiny_vit()
    costs = planner.CostModel(model)
    costs.calibrate(64, tokenreduce.count_flops(model, (3, 64, 64)), [17] * 5)
    reduced = tokenreduce.apply(planner.resized_model(model, 64), "tome", r=3, prop_attn=False)
    reduced(torch.zeros(1, 3, 64, 64))
    predicted = costs.predict(64, tokenreduce.token_counts(reduced))
    assert predicted == pytest.approx(tokenreduce.count_flops(reduced, (3, 64, 64)), rel=0.02)


def test_resized_model_resamples_the_position_embedding():
    model = tiny_vit()
    resized = planner.resized_model(model, 48)
    assert resized.pos_embed.shape[1] == 1 + 9 and model.pos_embed.shape[1] == 1 + 16
    assert resized(torch.randn(1, 3, 48, 48)).shape == (1, 5)


def test_measured_throughput_per_model_sizes():
    model = tiny_vit()
    small = planner.resized_model(model, 32)
    rates = ev.measure_throughput([model, small], (3, 64, 64), 2, torch.device("cpu"), warmup=0, repeats=1,
                                  batches=1, input_sizes=[(3, 64, 64), (3, 32, 32)])
    assert len(rates) == 2 and all(r > 0 for r in rates)
    with pytest.raises(ValueError, match="input_sizes"):
        ev.measure_throughput([model, small], (3, 64, 64), 2, torch.device("cpu"), input_sizes=[(3, 64, 64)])


@pytest.mark.slow
def test_tool_writes_a_plan(tmp_path, monkeypatch):
    data = tmp_path / "train"
    for label, name in enumerate(["a", "b"]):
        (data / name).mkdir(parents=True)
        for i, image in enumerate(random_images(4, 96)):
            image.save(data / name / f"{i}.png")
    sys.path.insert(0, str(REPO / "tools"))
    import plan as plan_tool

    out = tmp_path / "plan.json"
    code = plan_tool.main(["--model", "vit_tiny_patch16_224", "--data", str(data), "--flops", "0.6",
                           "--sizes", "112,160,224", "--families", "tome,evit", "--stages", "8",
                           "--speed-batch-size", "2", "--out", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    best = report["best"]
    assert best["gflops"] <= 0.6 * report["baseline"]["gflops"] * (1 + 1e-9)
    assert shlex.split(report["command"])[-4:] == ["--img-size", str(best["img_size"]), "--setting", best["setting"]]
    assert report["search_seconds"] > 0 and report["pareto"]
    assert plan_tool.main(["--model", "vit_tiny_patch16_224", "--data", str(data), "--flops", "2"]) == 2
