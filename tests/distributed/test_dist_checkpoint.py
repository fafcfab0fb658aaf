"""DCP checkpoints resume on another layout as if never interrupted; the HF export equals the
single-process model."""

import json

import pytest
import torch
from dist_harness import Spec, assert_same_run, reference_run, spec_json, train_worker
from dist_launch import run_ranks

import dsv3

STEPS, SAVE_AFTER = 4, 2
# saved by (world, layout) -> resumed on (world, layout)
CASES = {
    "fsdp2_to_1": ((2, {}), (1, {})),
    "fsdp2_to_ep2": ((2, {}), (2, {"ep": 2})),
    "ep2_to_dualpipev": ((2, {"ep": 2}), (2, {"pp": 2, "pp_schedule": "dualpipev"})),
}


@pytest.fixture(scope="module")
def reference():
    return reference_run(Spec(steps=STEPS))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One checkpointed run per saving layout (at step SAVE_AFTER), shared by the resume cases."""
    runs = {}

    def get(world: int, parallel: dict):
        key = json.dumps([world, parallel])
        if key not in runs:
            root = tmp_path_factory.mktemp("saved")
            spec = Spec(parallel=parallel, steps=STEPS, save_after=SAVE_AFTER, run_dir=str(root / "run"))
            run_ranks(train_worker, world, spec_json(spec), str(root / "run.json"))
            runs[key] = (root / "run", json.loads((root / "run.json").read_text()))
        return runs[key]

    return get


@pytest.mark.parametrize("case", CASES)
def test_resume_on_another_layout(case, saved, reference, tmp_path):
    (w1, p1), (w2, p2) = CASES[case]
    run_dir, first = saved(w1, p1)
    ref = reference[0]
    assert_same_run(first, ref)
    export = tmp_path / "hf" if case == "fsdp2_to_ep2" else None
    spec = Spec(parallel=p2, steps=STEPS, resume=True, run_dir=str(run_dir), export=export and str(export))
    run_ranks(train_worker, w2, spec_json(spec), str(tmp_path / "resumed.json"))
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert_same_run(resumed, {k: v[SAVE_AFTER:] for k, v in ref.items()})
    if export:  # the EP-sharded model, gathered to rank 0 and written in the HF layout
        model = dsv3.from_pretrained(export)
        tokens = torch.randint(0, model.cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            torch.testing.assert_close(model(tokens), reference[1].eval()(tokens), rtol=1e-4, atol=1e-4)
