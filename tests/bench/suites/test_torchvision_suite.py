"""The torchvision benchmark: each network in a process of its own, passed, failed or not run, and the summary."""

from torch import nn

from bench.suites import torchvision as suite
from cloud.build.methods.masks import sparsity


def test_filter_masks_take_whole_filters_and_leave_the_classifier_and_grouped_convs():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 4, 1))
    masks = suite.filter_masks(model, share=0.5)
    assert set(masks) == {"0.weight"}  # the depthwise conv and the last layer keep theirs
    assert masks["0.weight"].flatten(1).all(1).sum() == 4 and sparsity(masks) == 0.5


def test_skip_reasons_lose_the_layer_they_name():
    assert suite.reason_kind("layer1.0.conv2 is a grouped (not depthwise) or transposed conv") == (
        "LAYER is a grouped (not depthwise) or transposed conv"
    )
    assert suite.reason_kind("op _ElementWiseOp_9(HardsigmoidBackward0) may mix channels") == (
        "op HardsigmoidBackward0 may mix channels"
    )
    assert suite.reason_kind("reshape _Reshape_5() is not a flatten") == "reshape Reshape is not a flatten"
    assert suite.reason_kind("SPLIT op _SplitOp_3(None) is not supported") == "SPLIT op SplitOp is not supported"
    assert suite.reason_kind("trunk.block4-11.f.b.0 is a grouped conv") == "LAYER is a grouped conv"


def test_a_quick_run_measures_each_network_apart_lists_the_outcomes_and_resumes(monkeypatch, tmp_path):
    monkeypatch.setitem(suite.QUICK, "models", ("shufflenet_v2_x0_5", "not_a_model"))
    result = suite.run(quick=True, work=tmp_path)
    passed, unknown = result["records"]
    assert passed["outcome"] == "passed" and passed["input_dependent"]
    assert passed["channels_removed"] > 0 and passed["params_after"] < passed["params_before"]
    assert passed["max_abs_diff"] <= 1e-4 and passed["groups_skipped"]  # the channel shuffle's groups
    assert unknown["outcome"] == "failed" and "unknown torchvision architecture" in unknown["error"]
    summary = result["summary"]
    assert summary["passed"] == summary["compacted"] == ["shufflenet_v2_x0_5"]
    assert list(summary["failed"]) == ["not_a_model"] and not summary["not_run"]
    assert all(models == ["shufflenet_v2_x0_5"] for models in summary["skipped_group_kinds"].values())
    monkeypatch.setattr(suite, "measure_in_child", None)  # a rerun measures nothing again
    assert suite.run(quick=True, work=tmp_path)["records"] == result["records"]
