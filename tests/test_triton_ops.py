"""The decode kernels' launcher: which launches go with programmatic dependent launch (PDL), and the ops'
fakes under PDL.  A recording stand-in takes the kernel's place, so these run without Triton or a GPU."""

import pytest
import torch
from helpers import assert_switch_keeps_decode
from torch._subclasses.fake_tensor import FakeTensorMode

from dsv3.inference import triton_ops


class Recorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **meta)` records the launch."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **meta: self.launches.append((grid, args, meta))


@pytest.fixture
def pdl_on(monkeypatch):
    monkeypatch.setattr(triton_ops, "PDL", True)
    monkeypatch.setattr(triton_ops, "_has_pdl", lambda index: index == 0)  # GPU 0 is a Hopper, GPU 1 is not


def test_pdl_only_for_few_rows_on_a_hopper_gpu(pdl_on):
    cuda0, cuda1 = torch.device("cuda", 0), torch.device("cuda", 1)
    assert triton_ops.use_pdl(cuda0, 1)
    assert not triton_ops.use_pdl(cuda0, triton_ops.PDL_MAX_ROWS + 1)
    assert not triton_ops.use_pdl(cuda1, 1)
    assert not triton_ops.use_pdl(torch.device("cpu"), 1)


def test_pdl_off_decides_nothing(monkeypatch):
    monkeypatch.setattr(triton_ops, "PDL", False)
    monkeypatch.setattr(triton_ops, "_has_pdl", lambda index: True)
    assert not triton_ops.use_pdl(torch.device("cuda", 0), 1)


@pytest.fixture
def in_opaque_op(monkeypatch):
    """As inside an opaque op's body, which launches its kernels itself."""
    monkeypatch.setattr(triton_ops._opaque, "active", True, raising=False)


def test_a_launch_sets_the_kernels_pdl_constexpr(pdl_on, in_opaque_op):
    kernel, x = Recorder(), torch.randn(3, 5)
    triton_ops.launch(kernel, rows=3)[(7, 2)](x, 11, BLOCK=16, num_warps=4)
    (grid, args, meta), = kernel.launches
    assert grid == (7, 2) and args[0] is x and args[1] == 11
    assert meta == {"PDL": False, "BLOCK": 16, "num_warps": 4}  # a CPU tensor: no launch_pdl


def test_a_pdl_launch_sets_launch_pdl(pdl_on, in_opaque_op, monkeypatch):
    monkeypatch.setattr(triton_ops, "use_pdl", lambda device, rows: True)
    kernel = Recorder()
    triton_ops.launch(kernel, rows=1)[(4,)](torch.randn(1, 5), BLOCK=16)
    (_, _, meta), = kernel.launches
    assert meta == {"PDL": True, "launch_pdl": True, "BLOCK": 16}


def test_the_fake_of_an_op_launches_nothing(pdl_on, in_opaque_op):
    kernel = Recorder()
    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.randn(1, 5))
        assert triton_ops.launch(kernel, rows=1)[(1,)](x, BLOCK=16) is None
    assert kernel.launches == []


def test_outside_an_opaque_op_inductor_launches(pdl_on, monkeypatch):
    """A triton_op's body hands its launches to wrap_triton (which inductor traces), never with PDL."""
    wrapped = []
    monkeypatch.setattr(torch.library, "wrap_triton", lambda kernel: wrapped.append(kernel) or kernel)
    kernel = Recorder()
    triton_ops.launch(kernel, rows=1)[(4,)](torch.randn(1, 5), BLOCK=16)
    (_, _, meta), = kernel.launches
    assert wrapped == [kernel] and meta == {"PDL": False, "BLOCK": 16}


@pytest.fixture(scope="module")
def picking_op():
    """A decode op registered as with PDL (Triton present) whose body says whether it ran as the opaque op."""
    with pytest.MonkeyPatch.context() as m:
        m.setattr(triton_ops, "HAVE_TRITON", True)
        m.setattr(triton_ops, "PDL", True)

        @triton_ops.kernel_op("dsv3_test::picking")
        def picking(x: torch.Tensor) -> torch.Tensor:
            return torch.full_like(x, float(getattr(triton_ops._opaque, "active", False)))

    return picking


@pytest.mark.parametrize("rows", [1, 2])
def test_an_op_runs_opaque_only_where_its_rows_go_with_pdl(picking_op, monkeypatch, rows):
    monkeypatch.setattr(triton_ops, "use_pdl", lambda device, r: r <= 1)
    assert picking_op(torch.randn(rows, 3)).eq(rows <= 1).all()
    assert not getattr(triton_ops._opaque, "active", False)  # reset after the body


opaque = pytest.mark.skipif(not triton_ops.PDL, reason="no opaque ops (no Triton, or DSV3_PDL=0 at import): no PDL")


@pytest.mark.gpu
@opaque
def test_gpu_decode_with_pdl_equals_without(monkeypatch):
    """PDL only orders the kernels differently: a batch-1 compiled, captured decode gives the same logits."""
    assert_switch_keeps_decode(monkeypatch, triton_ops, "PDL", tol=0.0)

