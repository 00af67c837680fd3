"""`structured`: settings refused by name, the channel ladder, layer shapes predicted for pruned chains
of every zoo family, importance and allocation on known numbers, and a tiny real chain that shrinks at
every level and resumes where it was interrupted."""

import json
import logging

import pytest
import torch
from torch import nn

from cloud.build import data as build_data
from cloud.build import portfolio
from cloud.build.methods import allocation, chain, importance, served, structured, topology
from cloud.build.methods.base import BuildContext
from cloud.build.methods.latency_table import LatencyTable, Shape, Table, channel_ladder
from cloud.build.settings import SettingsError
from cloud.build.store import PortfolioStore
from cloud.build.train import TrainConfig, evaluate
from common import models, variant
from common.datasets import Dataset
from common.profiling import count_macs

KW28 = {"in_channels": 1, "input_size": 28, "num_classes": 10}
EXAMPLE = torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"speedups": (2.0, 1.5)}, "speedups must be >= 1 and increasing"),
        ({"speedups": (0.5, 2.0)}, "speedups must be >= 1 and increasing"),
        ({"speedups": (2.0, 2.0)}, "speedups must be >= 1 and increasing"),
        ({"speedups": ()}, "speedups must be >= 1 and increasing, got none"),
        ({"importance": "fisher"}, "unknown importance 'fisher'; known: bn, l2, taylor"),
        ({"balance": "max"}, "unknown balance 'max'; known: log, mean, none, share"),
        ({"distill_alpha": 1.5}, "distill_alpha must be in"),
        ({"distill_alpha": -0.1}, "distill_alpha must be in"),
        ({"distill_temperature": 0.0}, "distill_temperature must be > 0"),
        ({"step_speedup": 1.0}, "step_speedup must be > 1"),
        ({"finetune_epochs": -1}, "finetune_epochs"),
        ({"channel_multiple": 0}, "channel_multiple must be >= 1"),
        ({"min_channels": 0}, "min_channels must be >= 1"),
        ({"latency_batch": 0}, "latency_batch must be >= 1"),
        ({"max_drop": -1.0}, "max_drop must be >= 0 points"),
        ({"uniform_floor": 1.5}, "uniform_floor must be in"),
    ],
)
def test_bad_settings_are_refused_naming_the_setting(changes, named):
    with pytest.raises(SettingsError, match=named.replace("(", r"\(")):
        structured.StructuredConfig(**changes)


def test_the_ladder_steps_down_by_channel_blocks_then_halves():
    assert channel_ladder(64, 16, 4) == [64, 48, 32, 16, 8, 4]
    assert channel_ladder(100, 16, 4)[:3] == [100, 96, 80] and channel_ladder(100, 16, 4)[-3:] == [16, 8, 4]
    assert channel_ladder(12, 16, 4) == [12, 8, 4]  # two blocks or fewer: quarter blocks
    assert channel_ladder(16, 16, 4) == [16, 12, 8, 4]
    assert channel_ladder(32, 16, 4) == [32, 28, 24, 20, 16, 12, 8, 4]
    assert channel_ladder(33, 16, 4) == [33, 32, 16, 8, 4]
    assert channel_ladder(10, 2, 2) == [10, 8, 6, 4, 2]
    assert channel_ladder(4, 16, 4) == [4]
    assert channel_ladder(40, 1, 38) == [40, 39, 38]


def _layer_shape(layer: nn.Module) -> tuple[int, int]:
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    return layer.in_channels // layer.groups, layer.out_channels


@pytest.mark.parametrize(
    ("arch", "width"), [("vgg11", 0.25), ("resnet20", 0.5), ("mobilenetv2", 0.5), ("torchvision:resnet18", 1.0)]
)
def test_every_layer_of_a_pruned_chain_has_the_shape_its_topology_predicts(arch, width):
    torch.manual_seed(0)
    model = models.build(arch, {**KW28, "width": width}).eval()
    classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    ladder = lambda c: channel_ladder(c, 8, 2)  # noqa: E731
    for round_ in range(1 if arch.startswith("torchvision:") else 2):  # each pruned from the one before
        analysis = chain.analysis(model, EXAMPLE)
        found = topology.build(analysis)
        assert found.groups and not any(link.out_group for name, link in found.links.items() if name.endswith("fc"))
        # every second group one rung down, the others as they are
        counts = {
            g: (ladder(c) + [c])[1] if i % 2 == round_ % 2 else c for i, (g, c) in enumerate(found.groups.items())
        }
        allocation.prune(model, EXAMPLE, importance.l2(analysis), counts)
        for name, layer in models.prunable_layers(model).items():
            assert _layer_shape(layer) == found.shape(name, counts), name
        out = model(torch.randn(3, 1, 28, 28))
        assert out.shape == (3, 10) and torch.isfinite(out).all()
    assert classifier.out_features == 10


def test_pruning_keeps_the_most_important_channels():
    torch.manual_seed(0)
    model = models.build("vgg11", {**KW28, "width": 0.25}).eval()
    with torch.no_grad():
        model.features[4].weight[3] = 0  # a filter and its BatchNorm scale and shift: nothing left
        model.features[5].weight[3] = model.features[5].bias[3] = 0
    analysis = chain.analysis(model, EXAMPLE)
    scores = importance.l2(analysis)
    assert int(scores["features.4"].argmin()) == 3  # only its input columns in the next conv are left
    shares, means = importance.normalized(scores, "share"), importance.normalized(scores, "mean")
    assert all(float(s.sum()) == pytest.approx(1.0) for s in shares.values())
    assert all(float(s.mean()) == pytest.approx(1.0) for s in means.values())
    allocation.prune(model, EXAMPLE, scores, {"features.4": 15})
    assert model.features[4].out_channels == 15 and bool(model.features[4].weight.flatten(1).abs().sum(1).gt(0).all())


def _two_groups() -> tuple[nn.Module, topology.Topology]:
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 10),
    ).eval()  # fmt: skip
    return net, topology.build(chain.analysis(net, torch.randn(1, 1, 4, 4)))


def _table(found: topology.Topology, per_channel: dict[str, float]) -> LatencyTable:
    """Times that grow by `per_channel[layer]` ms per output channel (a table written by hand)."""
    counts = tuple(range(1, 9))
    rows = {n: tuple(per_channel[n] * c for c in counts) for n in per_channel}
    tables = [Table(Shape("conv"), (1, 8), counts, (rows[n], rows[n])) for n in per_channel]
    return LatencyTable(32, 1, "cpu", {n: i for i, n in enumerate(per_channel)}, tuple(tables))


def test_allocation_spends_removals_where_importance_per_millisecond_is_lowest():
    net, found = _two_groups()
    assert found.groups == {"0": 8, "3": 8} and found.shape("7", {"3": 4}) == (64, 10)
    table = _table(found, {"0": 1.0, "3": 0.1})  # a channel of group 0 saves ten times more
    equal = {"0": torch.ones(8, dtype=torch.float64), "3": torch.ones(8, dtype=torch.float64)}
    ladder = lambda c: channel_ladder(c, 2, 2)  # noqa: E731
    assert table.predict(found, found.groups) == pytest.approx(8.8)
    counts = allocation.allocate(found, table, equal, 6.85, dict(found.groups), ladder)
    assert counts == {"0": 6, "3": 8} and table.predict(found, counts) <= 6.85
    precious = {"0": torch.full((8,), 100.0, dtype=torch.float64), "3": equal["3"]}
    counts = allocation.allocate(found, table, precious, 8.45, dict(found.groups), ladder)
    assert counts == {"0": 8, "3": 4}
    floor = allocation.allocate(found, table, equal, 0.0, dict(found.groups), ladder)
    assert floor == allocation.floor_counts(found, ladder) == {"0": 2, "3": 2}


def test_the_weighted_log_shrinks_every_group_where_the_knapsack_empties_the_cheapest():
    net, found = _two_groups()
    counts = tuple(range(1, 9))  # conv 0 takes 0.5 ms per output channel; conv 3 grows with its inputs too
    first = Table(Shape("conv"), (1,), counts, (tuple(0.5 * c for c in counts),))
    second = Table(Shape("conv"), counts, counts, tuple(tuple(0.5 * i * o / 8 for o in counts) for i in counts))
    table = LatencyTable(32, 1, "cpu", {"0": 0, "3": 1}, (first, second))
    flat = {"0": torch.ones(8, dtype=torch.float64), "3": torch.ones(8, dtype=torch.float64)}
    ladder = lambda c: channel_ladder(c, 2, 2)  # noqa: E731
    knapsack = allocation.allocate(found, table, flat, 3.0, dict(found.groups), ladder)
    assert knapsack == {"0": 2, "3": 8}  # group 0 saves the most per channel: it goes to the floor first
    weighted = allocation.allocate(found, table, flat, 3.0, dict(found.groups), ladder, log=True)
    assert weighted["3"] < 8 and table.predict(found, weighted) <= 3.0


def test_a_group_whose_next_rung_saves_nothing_still_shrinks_to_one_that_does():
    net, found = _two_groups()
    counts = tuple(range(1, 9))  # conv 0: 0.5 ms per channel; conv 3: flat from 5 to 8 channels, then far less
    first = Table(Shape("conv"), (1,), counts, (tuple(0.5 * c for c in counts),))
    flat = tuple(3.0 if c > 4 else 0.5 for c in counts)
    table = LatencyTable(32, 1, "cpu", {"0": 0, "3": 1}, (first, Table(Shape("conv"), (1, 8), counts, (flat, flat))))
    equal = {"0": torch.ones(8, dtype=torch.float64), "3": torch.ones(8, dtype=torch.float64)}
    ladder = lambda c: channel_ladder(c, 2, 2)  # noqa: E731
    # 8 -> 6 channels of group 3 saves nothing, 8 -> 4 saves 2.5 ms: cheaper per ms than any cut of group 0
    assert allocation.allocate(found, table, equal, 4.5, dict(found.groups), ladder) == {"0": 8, "3": 4}


def test_a_uniform_floor_keeps_the_cheapest_group_from_being_emptied():
    net, found = _two_groups()
    counts = tuple(range(1, 9))  # as above: the knapsack empties group 0 on its own
    first = Table(Shape("conv"), (1,), counts, (tuple(0.5 * c for c in counts),))
    second = Table(Shape("conv"), counts, counts, tuple(tuple(0.5 * i * o / 8 for o in counts) for i in counts))
    table = LatencyTable(32, 1, "cpu", {"0": 0, "3": 1}, (first, second))
    flat = {"0": torch.ones(8, dtype=torch.float64), "3": torch.ones(8, dtype=torch.float64)}
    ladder = lambda c: channel_ladder(c, 2, 2)  # noqa: E731
    dense = dict(found.groups)
    # at 3 ms the widest uniform multiplier is a half (4 and 4 channels: 2 + 1 ms)
    assert allocation.uniform_floors(found, table, dense, 3.0, ladder, 1.0) == {"0": 4, "3": 4}
    assert allocation.uniform_floors(found, table, dense, 3.0, ladder, 0.5) == {"0": 2, "3": 2}
    floors = allocation.uniform_floors(found, table, dense, 3.0, ladder, 1.0)
    assert allocation.allocate(found, table, flat, 3.0, dict(dense), ladder, floors=floors) == {"0": 4, "3": 4}
    # a goal not even the narrowest model meets sets no floor; a group already below its floor stays as it is
    assert allocation.uniform_floors(found, table, dense, 0.1, ladder, 1.0) == {}
    narrowed = topology.Topology({"0": 2, "3": 8}, found.links)
    assert allocation.uniform_floors(narrowed, table, dense, 3.0, ladder, 1.0)["0"] == 2


def test_the_goal_follows_the_measurements_within_bounds():
    assert allocation.goal_for([(10.0, 1.0)], 2.0, margin=1.0) == pytest.approx(5.0)  # proportional
    # measured short of the goal: the secant of the last two points says how much further to go
    assert allocation.goal_for([(10.0, 1.0), (6.0, 0.55)], 2.0, margin=1.0) == pytest.approx(6.0 - 0.05 / 0.1125)
    # a measurement that says nothing was gained moves the goal at most MAX_CUT below the last prediction
    low = allocation.goal_for([(10.0, 1.0), (5.0, 0.99)], 2.0, margin=1.0)
    assert low == pytest.approx((1 - allocation.MAX_CUT) * 5.0)


def test_a_step_that_jumps_far_past_its_goal_is_pruned_less_again():
    reaches = lambda speedup, goal: speedup >= 1.03 * goal  # noqa: E731
    parent, short = (10.0, 1.0), (6.0, 1.8)
    # short of the goal: on down the secant, as goal_for has it
    assert allocation.next_goal(parent, [short], 2.0, reaches) == allocation.goal_for([parent, (6.0, 1 / 1.8)], 2.0)
    assert allocation.next_goal(parent, [short, (5.0, 2.1)], 2.0, reaches) is None  # reached, not far past: done
    # 3x for a goal of 2x: halfway back toward the attempt that fell short, then between the two that bound it
    assert allocation.next_goal(parent, [short, (4.0, 3.0)], 2.0, reaches) == pytest.approx(5.0)
    assert allocation.next_goal(parent, [short, (4.0, 3.0), (5.0, 1.9)], 2.0, reaches) == pytest.approx(4.5)
    assert allocation.next_goal(parent, [(4.0, 3.0)], 2.0, reaches) == pytest.approx(7.0)  # or toward the parent
    assert allocation.next_goal(parent, [(5.0, 1.9), (4.95, 3.0)], 2.0, reaches) is None  # too close to split
    # the step keeps the least pruned attempt that reaches its goal, else its last
    assert allocation.kept_attempt([short, (4.0, 3.0), (5.0, 2.1)], 2.0, reaches) == 2
    assert allocation.kept_attempt([short, (4.0, 3.0), (5.0, 1.9)], 2.0, reaches) == 1
    assert allocation.kept_attempt([short, (5.5, 1.9)], 2.0, reaches) == 1


def _tiny(data: Dataset) -> Dataset:
    return Dataset(data.info, data.train.subset(300, 0), data.val, data.test.subset(200, 0))


def _weights(model: nn.Module) -> int:
    return sum(layer.weight.numel() for layer in models.prunable_layers(model).values())


@pytest.fixture
def one_thread():
    """Times taken on one thread: the chain's measurements are many short runs, and on a machine
    shared with other work two threads spend most of them waiting for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_tiny_chain_shrinks_at_every_level_and_resumes_where_it_stopped(fashion_mnist, tmp_path, one_thread):
    settings = structured.StructuredConfig(speedups=(1.5, 2.0))
    config = portfolio.BuildConfig(
        out=tmp_path,
        model="vgg11",
        width=0.25,
        method="structured",
        train=TrainConfig(epochs=1, batch_size=64, progress=False),
        method_settings=settings,
    )
    context = BuildContext(config, _tiny(fashion_mnist), PortfolioStore(tmp_path))
    levels = structured.levels(context, settings)
    first = [next(levels), next(levels)]  # the dense model and the first variant, then interrupted
    levels.close()
    work = tmp_path / "work" / "structured"
    table = (work / "latency.json").read_bytes()
    found = list(structured.levels(context, settings))
    assert [s.level for s in found] == [0, 1, 2] and (work / "latency.json").read_bytes() == table
    for before, again in zip(first, found):
        assert before.model.state_dict().keys() == again.model.state_dict().keys()
        assert all(torch.equal(v, again.model.state_dict()[k]) for k, v in before.model.state_dict().items())
    shape = (1, 28, 28)
    params = [models.count_params(s.model) for s in found]
    macs = [count_macs(s.model, shape) for s in found]
    assert params == sorted(set(params), reverse=True) and macs == sorted(set(macs), reverse=True)
    assert [s.compression for s in found] == sorted(set(s.compression for s in found))
    assert found[-1].compression == pytest.approx(_weights(found[0].model) / _weights(found[-1].model))
    for s in found:
        assert s.compact and not s.masks and s.model.classifier.out_features == 10
        assert s.model(torch.randn(4, *shape)).shape == (4, 10)
    steps = [chain.load_step(p) for p in sorted(work.glob("step-*.json"), key=lambda p: int(p.stem.split("-")[1]))]
    predicted = [s.predicted_ms for s in steps]
    assert predicted == sorted(set(predicted), reverse=True)  # the latency model's predictions fall
    for level, target in enumerate(settings.speedups, 1):
        last = [s for s in steps if s.level <= level][-1]  # the variant: reached it, or the level's last step
        assert served.reaches(last.speedup, target) or (last.level == level and last.variant)
    spent = json.loads((work / "chain.json").read_text())
    assert spent["dense_epochs"] + spent["finetune_epochs"] <= 1 + len(settings.speedups) * 1  # shifter's


def test_a_portfolio_built_with_structured_stores_variants_that_load_as_they_were_measured(tmp_path, one_thread):
    settings = structured.StructuredConfig(speedups=(1.3,))
    config = portfolio.BuildConfig(
        out=tmp_path,
        model="vgg11",
        width=0.25,
        subset=300,
        test_subset=1000,
        threads=1,
        check_images=32,
        onnx=False,
        method="structured",
        train=TrainConfig(epochs=1, batch_size=64, progress=False),
        method_settings=settings,
    )
    manifest = portfolio.build(config)
    assert [v.level for v in manifest.variants] == [0, 1] and manifest.method == "structured"
    dense, pruned = manifest.variants
    assert pruned.params < dense.params and pruned.compression > 1.0 and pruned.name == "vgg11-1.3x"
    store = PortfolioStore(tmp_path)
    data = build_data.for_build(config)
    for entry in manifest.variants:
        loaded = variant.load(store.variant_path(entry.variant_id), entry.variant_id)
        assert models.count_params(loaded.model) == entry.params
        assert evaluate(loaded.model, data.info, data.test) == pytest.approx(entry.accuracy, abs=1e-6)


def test_targets_beyond_the_fastest_pruning_are_left_out_and_none_left_is_refused(caplog):
    settings = structured.StructuredConfig(speedups=(1.5, 2.0, 5.0, 8.0))
    with caplog.at_level(logging.WARNING):
        kept = structured.reachable_targets(settings, 5.2, "vgg11")
    assert kept.speedups == (1.5, 2.0, 5.0) and kept.importance == settings.importance
    assert "leaving out 8x" in caplog.text and "5.20x" in caplog.text
    assert structured.reachable_targets(settings, 8.3, "vgg11") == settings
    with pytest.raises(SettingsError, match="speedups: 1.5x is beyond vgg11 on this CPU"):
        structured.reachable_targets(settings, 1.5, "vgg11")  # a target counts as reached only past it


def test_a_variant_that_loses_more_than_max_drop_on_validation_ends_the_chain(fashion_mnist, tmp_path, caplog):
    settings = structured.StructuredConfig(speedups=(1.5, 2.0, 8.0), max_drop=10.0)
    config = portfolio.BuildConfig(out=tmp_path, model="vgg11", width=0.125, method="structured")
    data = _tiny(fashion_mnist)
    context = BuildContext(config, data, PortfolioStore(tmp_path))
    torch.manual_seed(0)
    untrained = context.new_model()
    accuracy = evaluate(untrained, data.info, data.val)
    with caplog.at_level(logging.WARNING):
        assert chain.collapsed(context, settings, accuracy + 0.5, untrained, 2)  # 50 points below
    assert "leaving out 2x, 8x: the 2x variant scores" in caplog.text and "(--max-drop 10)" in caplog.text
    assert not chain.collapsed(context, settings, accuracy + 0.05, untrained, 2)  # 5 points: kept
    assert not chain.collapsed(context, settings, None, untrained, 2)  # no validation split
