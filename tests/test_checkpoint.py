"""HF-layout checkpoints: FP8 block scales, sharding with an index, MTP layers, strict name mapping."""

import json

import pytest
import torch
from helpers import randomize_, tiny_config
from safetensors.torch import load_file, save_file

import dsv3
from dsv3.checkpoint import dequantize_weight, quantize_weight, save_pretrained
from dsv3.checkpoint.names import is_fp8_linear


def _model(**overrides) -> dsv3.Transformer:
    m = dsv3.Transformer(tiny_config(**overrides)).eval()
    randomize_(m, 5)
    return m


def test_block_scales_use_ceil_division():
    w = torch.randn(576, 300)
    q, s = quantize_weight(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (5, 3)
    back = dequantize_weight(q, s, torch.float32)
    assert ((back - w).abs() <= w.abs().amax() * 2 ** -3).all()  # e4m3 keeps 3 mantissa bits
    with pytest.raises(ValueError, match="does not match"):
        dequantize_weight(q, s[:4], torch.float32)


def _write_fp8_checkpoint(src, dst):
    """A test helper independent of save_pretrained(fp8=True): quantise a saved BF16/FP32 checkpoint."""
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    reference = {}
    for shard in src.glob("*.safetensors"):
        tensors = load_file(shard)
        out = {}
        for name, t in tensors.items():
            if is_fp8_linear(name):
                q, s = quantize_weight(t)
                out[name], out[name + "_scale_inv"] = q, s
                reference[name] = dequantize_weight(q, s, torch.float32)
            else:
                out[name] = t
                reference[name] = t.float()
        save_file(out, dst / shard.name)
    (dst / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {k: shard.name for shard in dst.glob("*.safetensors") for k in load_file(shard)}}))
    return reference


def test_fp8_checkpoint_loads_to_dequantised_reference(tmp_path):
    model = _model(hidden_size=160, num_mtp_layers=1)  # 160 is not a multiple of 128: partial blocks
    model.save_pretrained(tmp_path / "bf16", dtype=torch.float32)
    reference = _write_fp8_checkpoint(tmp_path / "bf16", tmp_path / "fp8")
    loaded = dsv3.from_pretrained(tmp_path / "fp8", dtype=torch.float32)
    resaved = {}
    from dsv3.checkpoint.hf_io import _hf_tensors

    for name, t in _hf_tensors(loaded):
        resaved[name] = t
    assert set(resaved) == set(reference)
    for name, t in reference.items():
        assert torch.equal(resaved[name].float(), t), name


def test_save_pretrained_fp8_round_trip(tmp_path):
    from dsv3.checkpoint.hf_io import _hf_tensors

    model = _model(num_mtp_layers=1)
    model.save_pretrained(tmp_path, fp8=True)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    loaded = dict(_hf_tensors(dsv3.from_pretrained(tmp_path, dtype=torch.float32)))
    for name, original in _hf_tensors(model):
        expected = dequantize_weight(*quantize_weight(original), torch.float32) if is_fp8_linear(name) else original
        assert torch.equal(loaded[name], expected), name


def test_sharded_save_with_mtp_and_bf16(tmp_path):
    model = _model(num_mtp_layers=2)
    model.save_pretrained(tmp_path, dtype=torch.bfloat16, max_shard_bytes=40_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((tmp_path / s).exists() for s in shards)
    n = model.cfg.num_layers
    assert f"model.layers.{n}.eh_proj.weight" in index["weight_map"]
    assert f"model.layers.{n + 1}.shared_head.head.weight" in index["weight_map"]
    assert f"model.layers.{n}.mlp.gate.e_score_correction_bias" in index["weight_map"]
    loaded = dsv3.from_pretrained(tmp_path)
    assert loaded.embed.weight.dtype == torch.bfloat16
    assert loaded.layers[1].ffn.gate.bias.dtype == torch.float32
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(a.to(b.dtype), b, msg=name)


def _saved(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path, dtype=torch.float32)
    shard = next(tmp_path.glob("*.safetensors"))
    return shard, load_file(shard)


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.surprise.weight",
                                  "model.layers.2.mlp.gate_proj.weight",  # a dense MLP in an MoE layer
                                  "model.layers.2.mlp.experts.99.up_proj.weight"])  # past n_routed_experts
def test_unknown_tensor_is_an_error(tmp_path, name):
    """Names the map does not know, or knows but this model has no place for: one ValueError naming them."""
    shard, tensors = _saved(tmp_path)
    tensors[name] = torch.zeros(2)
    save_file(tensors, shard)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"][name] = shard.name
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="no place in the model") as e:
        dsv3.from_pretrained(tmp_path)
    assert name in str(e.value)


def test_missing_tensor_is_an_error(tmp_path):
    shard, tensors = _saved(tmp_path)
    del tensors["model.layers.2.mlp.experts.3.up_proj.weight"]
    del tensors["model.layers.1.self_attn.kv_a_layernorm.weight"]
    save_file(tensors, shard)
    (tmp_path / "model.safetensors.index.json").unlink()
    with pytest.raises(ValueError, match="missing") as e:
        dsv3.from_pretrained(tmp_path)
    assert "layers.1.attn.kv_norm.weight" in str(e.value) and "layers.2.ffn.experts.w13" in str(e.value)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        dsv3.from_pretrained(tmp_path)


@pytest.mark.parametrize("field,value", [("fmt", "e5m2"), ("weight_block_size", [64, 64]), ("quant_method", "gptq")])
def test_other_quantization_configs_are_refused(tmp_path, field, value):
    _model().save_pretrained(tmp_path, fp8=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"][field] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"quantization_config: {field}"):
        dsv3.from_pretrained(tmp_path)


@pytest.mark.parametrize("problem", ["e5m2", "no scale", "scale of a bf16 tensor", "64x64 scales"])
def test_fp8_tensors_other_than_block_scaled_e4m3_are_refused(tmp_path, problem):
    """Each one used to load silently wrong (e5m2 without its scale: weights off by 10^5) or with an
    error that named neither the tensor nor the block size."""
    _model().save_pretrained(tmp_path, fp8=True)
    shard = next(tmp_path.glob("*.safetensors"))
    tensors = load_file(shard)
    name = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    if problem == "e5m2":
        tensors[name] = tensors[name].float().to(torch.float8_e5m2)
    elif problem == "no scale":
        del tensors[name + "_scale_inv"]
    elif problem == "scale of a bf16 tensor":
        tensors[name] = tensors[name].float().to(torch.bfloat16)
    else:
        tensors[name + "_scale_inv"] = torch.ones(1, 2)
    save_file(tensors, shard)
    (tmp_path / "model.safetensors.index.json").unlink(missing_ok=True)
    with pytest.raises(ValueError, match=name):
        dsv3.from_pretrained(tmp_path)


def test_announced_mtp_layer_without_tensors_loads_without_mtp(tmp_path, caplog):
    """transformers writes num_nextn_predict_layers 1 by default and never saves MTP weights: such a
    checkpoint loads without MTP (warned); an MTP layer with some tensors missing stays an error."""
    model = _model(num_mtp_layers=0)
    model.save_pretrained(tmp_path / "hf", dtype=torch.float32)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}))
    loaded = dsv3.from_pretrained(tmp_path / "hf")
    assert loaded.cfg.num_mtp_layers == 0 and "loading without MTP" in caplog.text
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)

    _model(num_mtp_layers=1).save_pretrained(tmp_path / "mtp", dtype=torch.float32)
    shard = next((tmp_path / "mtp").glob("*.safetensors"))
    tensors = load_file(shard)
    del tensors[f"model.layers.{model.cfg.num_layers}.eh_proj.weight"]
    save_file(tensors, shard)
    (tmp_path / "mtp" / "model.safetensors.index.json").unlink(missing_ok=True)
    with pytest.raises(ValueError, match="missing"):
        dsv3.from_pretrained(tmp_path / "mtp")


def test_export_command_restores_dtype_and_fp8(tmp_path, capsys):
    """`dsv3 export` re-stores an HF-layout checkpoint as BF16 or block-scaled FP8 (with its tokenizer);
    each loads back to the source within its rounding.  Refusals are one line."""
    from dsv3.cli import main as cli

    torch.manual_seed(0)
    model = dsv3.Transformer(tiny_config(num_mtp_layers=1))
    randomize_(model, 0)
    src = tmp_path / "src"
    model.save_pretrained(src)
    (src / "tokenizer.json").write_text("{}")
    want = model.state_dict()
    for flags, tol in ((["--dtype", "bf16"], 1e-2), (["--fp8"], 8e-2)):
        out = tmp_path / "_".join(flags)
        assert cli(["export", "--ckpt", str(src), "--out", str(out), *flags]) == 0
        got = dsv3.from_pretrained(out).state_dict()
        assert got.keys() == want.keys()
        for k, w in want.items():
            if w.is_floating_point():
                assert (got[k].float() - w).abs().max().item() <= tol * max(w.abs().max().item(), 1e-6), k
        assert (out / "tokenizer.json").read_text() == "{}"
    assert cli(["export", "--ckpt", str(src), "--out", str(tmp_path / "--dtype_bf16")]) == 2  # exists
    assert cli(["export", "--ckpt", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 2


def test_fp8_export_keeps_power_of_two_scales_and_the_tokenizer_files(tmp_path):
    """A V3.1-style source (scale_fmt ue8m0: power-of-two weight scales) exported with --fp8 keeps its FP8
    bytes and its scale_fmt (re-quantising with amax/448 scales changed 86 % of the weights by up to 3 %);
    the chat template and generation config go along; --overwrite swaps the folder in only when done."""
    from dsv3.cli import main as cli

    torch.manual_seed(0)
    model = dsv3.Transformer(tiny_config())
    randomize_(model, 0)
    src = tmp_path / "v31"
    save_pretrained(model, src, fp8=True, scale_fmt="ue8m0")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (src / name).write_text(json.dumps({"name": name}))
    assert json.loads((src / "config.json").read_text())["quantization_config"]["scale_fmt"] == "ue8m0"
    out = tmp_path / "out"
    (out).mkdir()
    (out / "stale.txt").write_text("old export")
    assert cli(["export", "--ckpt", str(src), "--out", str(out), "--fp8", "--overwrite"]) == 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["scale_fmt"] == "ue8m0"
    assert not (out / "stale.txt").exists()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert json.loads((out / name).read_text()) == {"name": name}

    def tensors(folder):
        return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}

    a, b = tensors(src), tensors(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k].view(torch.uint8) if a[k].dtype == torch.float8_e4m3fn else a[k],
                           b[k].view(torch.uint8) if b[k].dtype == torch.float8_e4m3fn else b[k]), k
    scales = [v for k, v in a.items() if k.endswith("weight_scale_inv")]
    assert scales and all(torch.equal(s, torch.exp2(torch.log2(s).round())) for s in scales)  # powers of two
