"""The decode latent kernel (dsv3/inference/latent_small.py: q_norm, kv_norm, k_pe's rope and the cache
write in one launch) against its twin, the model's own q_norm, kv_norm, `apply_rope` and
`LatentCache.write`:
on CPU under Triton's interpreter (run with `TRITON_INTERPRET=1` where Triton is installed, else skipped),
compiled by Inductor up to its final graph (Triton installed, not interpreted: the cache must stay in
place, and with mla_decode's kernels also on the step keeps no RoPE arithmetic of its own), and (GPU) in
BF16, compiled and captured, and inside a decode step.

Bit for bit: inputs on a grid of eighths make every sum of squares exact in fp32, so the kernel's
summation order cannot show, and everything else rounds where the twin does.  Triton 3.6's interpreter
truncates fp32 -> bf16 casts where GPUs (and torch) round to nearest even; `gpu_rounding` makes it round
as they do.  With random-normal inputs only the sum of squares' order differs: fp32 within 1e-6, BF16
within two units in the last place (one of the normalised value, doubled by the weight's product).
"""

import os

import numpy as np
import pytest
import torch
from helpers import (
    assert_switch_keeps_decode,
    decode_logits,
    interpreted,
    randomize_,
    tiny_config,
    tiny_model,
)

from dsv3 import ModelConfig
from dsv3.inference import latent_small, triton_ops
from dsv3.inference import mla_decode as mla_kernels
from dsv3.inference.cache import LatentCache
from dsv3.inference.compiled import mark_cache_dynamic
from dsv3.inference.forward import main_forward
from dsv3.inference.latent_small import norm_rope_write, use_latent_kernel
from dsv3.model.attention import MLA
from dsv3.model.rope import RotaryEmbedding, apply_rope

# compiled (not interpreted) Triton: kernels traced by torch.compile; the GPU compiles them for real
compiled_triton = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                     reason="TRITON_INTERPRET=1: torch.compile cannot trace interpreted kernels")


def random_mla(cfg: ModelConfig, dtype=torch.float32, device="cpu", seed: int = 0) -> MLA:
    torch.manual_seed(seed)
    attn = MLA(cfg).eval()
    randomize_(attn, seed)  # norm weights around 1
    return attn.to(device, dtype)


POSITIONS = {  # [B, T] ragged rows of a 16-slot cache; T = 2 is an MTP verify step
    (1, 1): [[6]], (1, 2): [[6, 7]], (3, 1): [[4], [0], [15]], (3, 2): [[4, 5], [0, 1], [14, 15]],
}


def operands(attn: MLA, positions: torch.Tensor, dtype, exact: bool, seed: int = 0, layers: int = 3, slots: int = 16):
    """q_a, kv_a at positions [B, T], the rope (its tables for the kernel, their rows for the twin), and a cache
    of `layers` x B x `slots` holding random data (the slots the step does not write must keep it).
    exact: values k/8, |k| <= 32 (see the docstring)."""
    g = torch.Generator().manual_seed(seed)
    b, t = positions.shape
    cfg, device = attn.cfg, positions.device

    def draw(*shape):
        x = torch.randint(-32, 33, shape, generator=g) / 8 if exact else torch.randn(shape, generator=g)
        return x.to(device, dtype)

    q_a, kv_a = draw(b, t, cfg.q_lora_rank), draw(b, t, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    rope = RotaryEmbedding(cfg).to(device)
    cache = LatentCache(layers, b, slots, cfg.kv_lora_rank, cfg.qk_rope_head_dim, dtype, device)
    cache.kv.copy_(torch.randn(cache.kv.shape, generator=g))
    return q_a, kv_a, rope, cache


def twin(attn: MLA, q_a, kv_a, rope: RotaryEmbedding, cache: LatentCache, layer: int, positions) -> torch.Tensor:
    """What `cached_mla` does without the kernel, after the projections."""
    c_kv, k_pe = kv_a.split([attn.cfg.kv_lora_rank, attn.rope], dim=-1)
    cos, sin = rope.lookup(positions)
    cache.write(layer, positions, attn.kv_norm(c_kv), apply_rope(k_pe, cos, sin))
    return attn.q_norm(q_a)


def copy_of(cache: LatentCache) -> LatentCache:
    other = LatentCache(*cache.kv.shape[:3], cache.kv_lora_rank, cache.rope_dim, cache.kv.dtype, cache.kv.device)
    other.kv.copy_(cache.kv)
    return other


def both(attn: MLA, positions: torch.Tensor, dtype, exact: bool, layer: int = 1, slots: int = 16):
    """(kernel's q_a_normed, its cache), (twin's q_a_normed, its cache) on the same operands."""
    q_a, kv_a, rope, cache = operands(attn, positions, dtype, exact, slots=slots)
    ref = copy_of(cache)
    with torch.no_grad():
        want = twin(attn, q_a, kv_a, rope, ref, layer, positions)
        got = norm_rope_write(attn, q_a, kv_a, rope.cos_table, rope.sin_table, cache, layer, positions)
    return (got, cache.kv), (want, ref.kv)


def ulps_apart(a: torch.Tensor, b: torch.Tensor) -> int:
    """The largest distance between a and b in units of b's last place (finite values of one dtype)."""
    eps = torch.finfo(b.dtype).eps
    unit = torch.exp2(torch.floor(torch.log2(b.float().abs().clamp_min(torch.finfo(b.dtype).tiny)))) * eps
    return int(((a.float() - b.float()).abs() / unit).max().item())


def test_rule_is_cuda_decode_only():
    attn = random_mla(tiny_config())
    x = torch.randn(1, 1, attn.cfg.hidden_size)
    cache = LatentCache(3, 1, 8, attn.cfg.kv_lora_rank, attn.rope, torch.float32, "cpu")
    visible = torch.ones(1, 1, 4, dtype=torch.bool)
    assert not use_latent_kernel(attn, x, cache, visible)  # CPU


def test_one_dtype_is_required():
    attn = random_mla(tiny_config())
    positions = torch.tensor([[3]])
    q_a, kv_a, rope, cache = operands(attn, positions, torch.float32, exact=True)
    with pytest.raises(ValueError, match="one dtype"):
        norm_rope_write(attn, q_a.bfloat16(), kv_a, rope.cos_table, rope.sin_table, cache, 0, positions)


def test_tables_are_checked():
    """The kernel indexes the [P, R / 2] tables by position: the rows at the positions (the old per-row
    form), tables of another rope width or transposed ones are refused."""
    attn = random_mla(tiny_config())
    positions = torch.tensor([[3]])
    q_a, kv_a, rope, cache = operands(attn, positions, torch.float32, exact=True)
    cos, sin = rope.cos_table, rope.sin_table
    for tables in (rope.lookup(positions), (cos[:, :-1], sin[:, :-1]), (cos.t().contiguous().t(), sin)):
        with pytest.raises(ValueError, match=r"cos_table and sin_table \[P, R / 2\]"):
            norm_rope_write(attn, q_a, kv_a, *tables, cache, 0, positions)


# ------------------------------------------------------------------------------------------ interpreter


@pytest.fixture
def gpu_rounding(monkeypatch):
    """The interpreter's fp32 -> bf16 casts round to nearest even, as GPUs do (Triton 3.6 truncates)."""
    tl = pytest.importorskip("triton.language")
    from triton.runtime import interpreter

    truncating = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            x = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32))
            return interpreter.TensorHandle(x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return truncating(self, src, dst_type)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "cast_impl", cast_impl)


CONFIGS = {"tiny": tiny_config(),  # q 48 (padded to 64), latent 32, rope 8
           "bench": ModelConfig.from_preset("bench")}  # q 1536 (padded to 2048), latent 512, rope 64


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bt", list(POSITIONS))
@pytest.mark.parametrize("name", list(CONFIGS))
def test_interpreted_kernel_equals_twin_bit_for_bit(gpu_rounding, name, bt, dtype):
    pytest.importorskip("triton")
    attn = random_mla(CONFIGS[name], dtype)
    (got, kv), (want, kv_want) = both(attn, torch.tensor(POSITIONS[bt]), dtype, exact=True)
    assert got.dtype == want.dtype == dtype and got.shape == want.shape
    assert torch.equal(got, want)
    assert torch.equal(kv, kv_want)  # the written slots, and every other layer, row and slot untouched


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_interpreted_random_normal_inputs(gpu_rounding, dtype):
    pytest.importorskip("triton")
    attn = random_mla(CONFIGS["bench"], dtype)
    (got, kv), (want, kv_want) = both(attn, torch.tensor(POSITIONS[3, 2]), dtype, exact=False)
    if dtype == torch.float32:
        assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-6
        assert ((kv - kv_want).abs().max() / kv_want.abs().max()).item() <= 1e-6
    else:  # a normalised value one unit apart can be two apart after the weight's product
        assert ulps_apart(got, want) <= 2 and ulps_apart(kv, kv_want) <= 2


@interpreted
def test_interpreted_negative_position_wraps_as_index_put():
    pytest.importorskip("triton")
    attn = random_mla(tiny_config())
    (got, kv), (want, kv_want) = both(attn, torch.tensor([[-1], [2]]), torch.float32, exact=True)
    assert torch.equal(got, want) and torch.equal(kv, kv_want)


@interpreted
def test_interpreted_positions_outside_the_tables_read_their_ends_as_lookup():
    """Rows past the tiny config's 64 positions (a finished sequence of a ragged batch keeps stepping) read
    the tables' last row, below -64 the first, as `RotaryEmbedding.lookup` does; the cache has room for them."""
    pytest.importorskip("triton")
    attn = random_mla(tiny_config())
    (got, kv), (want, kv_want) = both(attn, torch.tensor([[70], [-70], [63]]), torch.float32, exact=True, slots=80)
    assert torch.equal(got, want) and torch.equal(kv, kv_want)


@interpreted
def test_interpreted_decode_through_the_kernel_equals_default(monkeypatch):
    """LATENT_KERNEL on and the rule forced true on CPU for decode steps: every layer of an eager decode
    norms, ropes and stores through the (interpreted) kernel, and the logits equal the default decode's (fp32)."""
    pytest.importorskip("triton")
    model = tiny_model()
    want = decode_logits(model, [3, 5, 7], 3)
    calls = []
    monkeypatch.setattr(latent_small, "LATENT_KERNEL", True)
    monkeypatch.setattr(latent_small, "use_latent_kernel",
                        lambda attn, x, cache, visible: visible is not None and not calls.append(x.shape))
    got = decode_logits(model, [3, 5, 7], 3)
    assert len(calls) >= 3 * model.cfg.num_layers
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5


# ------------------------------------------------------------------------------------------ in place under compile


class _Stop(Exception):
    pass


def post_grad_graph(monkeypatch, fn, *args) -> torch.fx.GraphModule:
    """fn compiled by Inductor (fullgraph) up to the graph it generates code from: after the post-grad
    passes, reinplacing included; code generation is skipped (it needs the device)."""
    from torch._inductor import compile_fx

    graphs = []
    passes = compile_fx.post_grad_passes

    def keep(gm, is_inference):
        passes(gm, is_inference)
        graphs.append(gm)
        raise _Stop

    torch._dynamo.reset()
    try:
        with monkeypatch.context() as patch, torch.no_grad(), pytest.raises(Exception) as stopped:
            patch.setattr(compile_fx, "post_grad_passes", keep)
            torch.compile(fn, fullgraph=True)(*args)
    finally:
        torch._dynamo.reset()
    assert graphs, f"compile failed before the post-grad passes: {stopped.value}"
    return graphs[0]


def cache_copies(gm: torch.fx.GraphModule, kv: torch.fx.Node) -> list[str]:
    """The nodes that copy at least a layer's slab of the cache: clones, copies, copy_ from another tensor,
    functional index_puts and scatters whose output spans the cache's max_len dim (the only dim no other
    tensor of a step has).  The self-copy kv.copy_(kv) that reinplacing leaves as the epilogue of a mutated
    input is no copy (Inductor drops it)."""
    slots = str(kv.meta["val"].shape[2])
    found = []
    for n in gm.graph.nodes:
        if n.op != "call_function" or not any(k in str(n.target) for k in ("clone", "copy", "index_put", "scatter")):
            continue
        if n.target is torch.ops.aten.copy_.default and n.args[0] is n.args[1]:
            continue
        if n.target is not torch.ops.aten.copy_.default and str(n.target).split(".")[-2].endswith("_"):
            continue  # in place (index_put_, scatter_): a copy only if its target is one, found as such
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor) and slots in [str(s) for s in val.shape]:
            found.append(n.format_node())
    return found


def placeholder_of(gm: torch.fx.GraphModule, cache: LatentCache) -> torch.fx.Node:
    """The graph input that is the cache: [layers, B, max_len, 576], B and max_len symbols."""
    (node,) = [n for n in gm.graph.nodes if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)
               and n.meta["val"].dim() == 4 and str(n.meta["val"].shape[0]) == str(cache.kv.shape[0])
               and str(n.meta["val"].shape[3]) == str(cache.kv.shape[3])]
    return node


def test_copy_check_tells_the_view_trap_from_the_in_place_write(monkeypatch):
    """`cache_copies` is not vacuous: it finds the slab copy of the view-form write that `LatentCache.write`
    warns about, and nothing in `LatentCache.write` itself."""
    cache = LatentCache(3, 2, 23, 32, 8, torch.float32, "cpu")
    mark_cache_dynamic(cache)
    latent, positions = torch.randn(2, 1, 40), torch.tensor([[5], [6]])

    def view_form(latent, positions):
        cache.kv[1].index_put_((cache.rows, positions), latent)

    def cache_write(latent, positions):
        cache.write(1, positions, latent[..., :32], latent[..., 32:])

    for fn, copies in ((view_form, True), (cache_write, False)):
        gm = post_grad_graph(monkeypatch, fn, latent, positions)
        assert bool(cache_copies(gm, placeholder_of(gm, cache))) == copies, fn.__name__


def sm90_if_no_gpu(monkeypatch) -> None:
    """Triton's analysis of which pointers a kernel stores to (what functionalisation needs) pointed at an
    sm_90 target where there is no GPU."""
    triton = pytest.importorskip("triton")
    if not torch.cuda.is_available():
        from triton.backends.compiler import GPUTarget

        class SM90:
            def get_current_target(self):
                return GPUTarget("cuda", 90, 32)

        monkeypatch.setattr(triton.runtime.driver, "_active", SM90())


def decode_step_graph(monkeypatch) -> tuple[torch.fx.GraphModule, object, LatentCache]:
    """The post-grad graph of a compiled decode step of the tiny model (batch 2, 8 slots seen) on a cache
    whose batch and length are symbols, as compiled decoding marks them; (graph, model, cache)."""
    model = tiny_model()
    cache = LatentCache.for_model(model, 2, 23)
    mark_cache_dynamic(cache)
    step = lambda tokens, positions: main_forward(model, cache, tokens, positions, 8)[0]
    return post_grad_graph(monkeypatch, step, torch.tensor([[3], [4]]), torch.tensor([[5], [6]])), model, cache


def op_calls(gm: torch.fx.GraphModule, *ops) -> list[tuple[torch.fx.Node, dict]]:
    """The calls of the given opaque decode ops (the `<name>_pdl` custom ops that launch their kernels
    themselves, so the graph holds the op, not its launches): (node, {the op's argument name: value})."""
    calls = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in ops:
            names = [a.name for a in n.target._schema.arguments]
            calls.append((n, {**dict(zip(names, n.args)), **n.kwargs}))
    return calls


def launches_pdl_or_not(monkeypatch, pdl: bool) -> None:
    """Every decode op call goes with PDL (its opaque op) or none does (its triton_op, whose launches inductor
    makes), whatever the rows and device; PDL needs the opaque ops registered (Triton, DSV3_PDL unset)."""
    if pdl and not triton_ops.PDL:
        pytest.skip("no opaque ops: DSV3_PDL=0 at import")
    monkeypatch.setattr(triton_ops, "use_pdl", lambda device, rows: pdl)


@compiled_triton
@pytest.mark.parametrize("pdl", [False, True])
def test_compiled_decode_step_writes_the_cache_in_place(monkeypatch, pdl):
    """Inductor's graph of a compiled decode step with the kernel: every layer's launch (or, with PDL, its
    op) takes the cache (the graph input itself) and nothing copies it.  Runs without a GPU (`sm90_if_no_gpu`)."""
    sm90_if_no_gpu(monkeypatch)
    launches_pdl_or_not(monkeypatch, pdl)
    monkeypatch.setattr(latent_small, "LATENT_KERNEL", True)
    monkeypatch.setattr(latent_small, "use_latent_kernel", lambda attn, x, cache, visible: visible is not None)
    gm, model, cache = decode_step_graph(monkeypatch)
    kv = placeholder_of(gm, cache)
    if pdl:  # the op itself, reinplaced onto the cache
        written = [args["kv"] for _, args in op_calls(gm, torch.ops.dsv3.norm_rope_write_pdl.default)]
    else:
        written = [n.kwargs["kwargs"]["KV"] for n in gm.graph.nodes
                   if n.target is torch.ops.higher_order.triton_kernel_wrapper_mutation and "KV" in n.kwargs["kwargs"]]
    assert len(written) == model.cfg.num_layers
    assert all(w is kv for w in written)
    assert not cache_copies(gm, kv)


@compiled_triton
@pytest.mark.parametrize("pdl", [False, True])
def test_compiled_decode_step_computes_no_rope_when_the_kernels_take_it(monkeypatch, pdl):
    """With both decode kernels on (this one and mla_decode's), every consumer of the step's cos/sin reads
    the rope tables by position inside a launch (or, with PDL, an op): Inductor's graph keeps no cos, sin or
    table lookup of its own (the lookup is dead code), and the tables reach every launch as they are."""
    sm90_if_no_gpu(monkeypatch)
    launches_pdl_or_not(monkeypatch, pdl)
    monkeypatch.setattr(latent_small, "LATENT_KERNEL", True)
    monkeypatch.setattr(latent_small, "use_latent_kernel", lambda attn, x, cache, visible: visible is not None)
    monkeypatch.setattr(mla_kernels, "MLA_KERNEL", True)
    monkeypatch.setattr(mla_kernels, "use_mla_decode", lambda q_nope, kv, wkv_b: True)
    gm, model, cache = decode_step_graph(monkeypatch)
    table_shape = [str(n) for n in model.rope.cos_table.shape]
    tables = [n for n in gm.graph.nodes if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)
              and [str(d) for d in n.meta["val"].shape] == table_shape]
    if pdl:  # per layer the latent op, then the MLA op (absorb, attend and out)
        calls = op_calls(gm, torch.ops.dsv3.norm_rope_write_pdl.default, torch.ops.dsv3.mla_decode_pdl.default)
        launches, per_layer = [n for n, _ in calls], 2
        fed = {args[k] for _, args in calls for k in ("cos_table", "sin_table")}
    else:
        launches, per_layer = [n for n in gm.graph.nodes if "triton_kernel_wrapper" in str(n.target)], 4
        fed = {n.kwargs["kwargs"][k] for n in launches for k in ("COS", "SIN") if k in n.kwargs["kwargs"]}
    assert len(tables) == 2 and len(launches) == per_layer * model.cfg.num_layers  # latent, then the MLA core
    assert all(user in launches for t in tables for user in t.users)
    assert fed == set(tables)  # the latent and absorb launches read the tables themselves
    assert not [n.format_node() for n in gm.graph.nodes if str(n.target).split(".")[-2:-1] in (["cos"], ["sin"])]


# ------------------------------------------------------------------------------------------ GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("bt", [(1, 1), (3, 2)])
def test_gpu_kernel_equals_twin_bf16(bt):
    attn = random_mla(ModelConfig.from_preset("bench"), torch.bfloat16, "cuda")
    positions = torch.tensor(POSITIONS[bt], device="cuda")
    for exact in (True, False):
        (got, kv), (want, kv_want) = both(attn, positions, torch.bfloat16, exact)
        # the GPU's fp32 division and rsqrt are approximate in both, and the kernel fuses multiply-adds: one
        # unit of the normalised value, two after the weight's product
        assert ulps_apart(got, want) <= 2 and ulps_apart(kv, kv_want) <= 2


@pytest.mark.gpu
def test_gpu_compiled_and_graph_captured_equal_eager():
    attn = random_mla(ModelConfig.from_preset("bench"), torch.bfloat16, "cuda")
    positions = torch.tensor(POSITIONS[3, 2], device="cuda")
    q_a, kv_a, rope, cache = operands(attn, positions, torch.bfloat16, exact=False)
    tables = rope.cos_table, rope.sin_table
    eager_cache = copy_of(cache)
    with torch.no_grad():  # as decoding runs: the op is inference-only (no backward)
        eager = norm_rope_write(attn, q_a, kv_a, *tables, eager_cache, 1, positions)
        compiled = torch.compile(lambda *a: norm_rope_write(attn, *a, cache, 1, positions), fullgraph=True)
        compiled(q_a, kv_a, *tables)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = compiled(q_a, kv_a, *tables)
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager) and torch.equal(cache.kv, eager_cache.kv)


@pytest.mark.gpu
def test_gpu_compiled_step_allocates_no_copy_of_the_cache(monkeypatch):
    """A compiled decode step keeps the cache's storage and allocates nothing near a layer's slab of it: a
    functional copy of the cache (or of the slab) would need a buffer that big.  The cache is ~250 MB."""
    monkeypatch.setattr(latent_small, "LATENT_KERNEL", True)
    model = tiny_model().cuda().to(torch.bfloat16)
    cache = LatentCache.for_model(model, 1, 2**20)  # 3 layers x 2^20 slots x 40 x 2 bytes, zeros
    mark_cache_dynamic(cache)
    tokens, positions = torch.tensor([[3]], device="cuda"), torch.tensor([[5]], device="cuda")
    step = torch.compile(lambda t, p: main_forward(model, cache, t, p, 8)[0], fullgraph=True)
    ptr = cache.kv.data_ptr()
    with torch.no_grad():
        step(tokens, positions)  # compiles and warms up
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(tokens, positions)
        torch.cuda.synchronize()
    assert cache.kv.data_ptr() == ptr
    assert torch.cuda.max_memory_allocated() - before < cache.kv[0].nbytes // 4
    written = cache.kv[:, 0].abs().sum(-1) != 0  # [layers, slots]: only slot 5 of every layer
    assert written[:, 5].all() and written.sum().item() == cache.kv.shape[0]


@pytest.mark.gpu
def test_gpu_decode_with_latent_kernel_equals_default(monkeypatch):
    assert_switch_keeps_decode(monkeypatch, latent_small, "LATENT_KERNEL")
