"""Every layout trains like one process: FSDP, FSDP + EP (also with recomputation), HSDP + EP,
pipelines (1F1B, DualPipeV), EP + PP -- the same per-step losses (<= 1e-5) and gradient norms (which,
unlike AdamW's steps, show a wrongly scaled gradient) from the same seed and data."""

import json

import pytest
from dist_harness import Spec, assert_same_run, reference_run, spec_json, train_worker
from dist_launch import run_ranks

LAYOUTS = {
    "fsdp": (2, {}),
    "fsdp_ep": (2, {"ep": 2}),
    "fsdp_ep_recompute": (2, {"ep": 2, "recompute": True}),
    "hsdp_ep": (4, {"dp_replicate": 2, "ep": 2}),
    "pp_1f1b": (2, {"pp": 2}),
    "pp_dualpipev": (2, {"pp": 2, "pp_schedule": "dualpipev"}),
    "ep_pp_1f1b": (4, {"pp": 2, "ep": 2}),
    "ep_pp_dualpipev": (4, {"pp": 2, "ep": 2, "pp_schedule": "dualpipev"}),
}


@pytest.fixture(scope="module")
def reference():
    return reference_run(Spec())[0]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_matches_one_process(layout, reference, tmp_path):
    world, parallel = LAYOUTS[layout]
    run_ranks(train_worker, world, spec_json(Spec(parallel=parallel)), str(tmp_path / "run.json"))
    assert_same_run(json.loads((tmp_path / "run.json").read_text()), reference)


def test_pipeline_passes_stage_validation(reference, tmp_path, monkeypatch):
    """Older torch checks every stage's inputs and outputs against the given metadata (shape, dtype,
    strides) on each forward; 2.13 does so only under TORCH_DISTRIBUTED_DEBUG=DETAIL: run a pipeline so."""
    monkeypatch.setenv("TORCH_DISTRIBUTED_DEBUG", "DETAIL")  # the spawned ranks inherit it
    world, parallel = LAYOUTS["pp_dualpipev"]
    run_ranks(train_worker, world, spec_json(Spec(parallel=parallel)), str(tmp_path / "run.json"))
    assert_same_run(json.loads((tmp_path / "run.json").read_text()), reference)
