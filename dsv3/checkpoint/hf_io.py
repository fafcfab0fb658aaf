"""Reading and writing the Hugging Face DeepSeek-V3 directory layout (config.json + safetensors shards + index).

Loading builds the model on the meta device (no memory), streams each tensor once from its shard,
dequantises FP8 weights with their `weight_scale_inv`, stacks per-expert tensors, and assigns.  Every
checkpoint tensor must map to a model tensor and every model tensor must be filled, or a `ValueError`
names the offenders.  Saving writes shards through a temporary folder renamed into place, so a crash
never leaves a half-written checkpoint where a good one was.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections import defaultdict
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import ModelConfig
from ..model import Transformer
from .fp8 import FP8_QUANT_CONFIG, check_quantization_config, dequantize_named, quantize_weight
from .names import Target, dsv3_to_hf, hf_to_dsv3, is_fp8_linear, mtp_copy_names

log = logging.getLogger(__name__)
SCALE_SUFFIX = "_scale_inv"
INDEX_FILE = "model.safetensors.index.json"
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _weight_map(path: Path) -> dict[str, str]:
    """Tensor name -> shard file name, from the index or from the single/unindexed shards."""
    index = path / INDEX_FILE
    if index.exists():
        try:
            return json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({type(e).__name__})") from e
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise ValueError(f"{path}: no safetensors files found")
    mapping = {}
    for shard in shards:
        try:
            with safe_open(shard, "pt") as f:
                mapping.update({k: shard.name for k in f.keys()})
        except Exception as e:
            raise ValueError(f"{shard}: unreadable safetensors file ({type(e).__name__}: {e})") from e
    return mapping


def read_config(path: Path, weight_map: dict[str, str]) -> tuple[dict, ModelConfig]:
    """config.json -> (the dict, the ModelConfig of the tensors present).  A config that announces MTP
    layers whose tensors are all absent (transformers writes num_nextn_predict_layers 1 by default and
    never saves MTP weights) loads without them, with a warning; a partial MTP layer stays an error."""
    if not (path / "config.json").exists():
        raise ValueError(f"{path}: not a checkpoint directory (no config.json)")
    hf_config = json.loads((path / "config.json").read_text())
    check_quantization_config(hf_config)
    cfg = ModelConfig.from_hf_config(hf_config)
    if cfg.num_mtp_layers and not any(_layer_index(name) >= cfg.num_layers for name in weight_map):
        log.warning("%s: config.json announces %d MTP layer(s) but the checkpoint has no tensors for them; "
                    "loading without MTP", path, cfg.num_mtp_layers)
        cfg = cfg.replace(num_mtp_layers=0)
    return hf_config, cfg


def _layer_index(hf_name: str) -> int:
    """model.layers.{i}.* -> i; -1 for other names."""
    parts = hf_name.split(".")
    return int(parts[2]) if len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit() else -1


def place(hf_name: str, cfg: ModelConfig, expected: dict) -> Target | None:
    """Where a checkpoint tensor goes in a model whose state dict is `expected`; None when it has no place
    there: a name the map does not know, or one it knows without a place in this model (a dense MLP in an
    MoE layer, an expert index past n_routed_experts, a routing bias without noaux_tc)."""
    try:
        target = hf_to_dsv3(hf_name, cfg)
    except KeyError:
        return None
    if target.name not in expected or (target.expert is not None and target.expert >= cfg.n_routed_experts):
        return None
    return target


def _checkpoint_dtype(hf_config: dict) -> torch.dtype:
    name = hf_config.get("torch_dtype") or hf_config.get("dtype") or "bfloat16"
    return _DTYPES.get(str(name).removeprefix("torch."), torch.bfloat16)


def from_pretrained(path: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                    **model_kwargs) -> Transformer:
    """Loads a HF-layout DeepSeek-V2/V3 directory into a `dsv3.Transformer`.

    dtype: None keeps the checkpoint's `torch_dtype` (FP8 weights are dequantised to it).  The routing
    bias always stays fp32.  model_kwargs go to `Transformer` (attn_impl, experts_impl)."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise ValueError(f"{path}: not a checkpoint directory (no config.json)")
    weight_map = _weight_map(path)
    hf_config, cfg = read_config(path, weight_map)
    dtype = dtype or _checkpoint_dtype(hf_config)
    device = torch.device(device or "cpu")
    with torch.device("meta"):
        model = Transformer(cfg, **model_kwargs)
    expected = model.state_dict()

    loaded: dict[str, torch.Tensor] = {}
    expert_parts: dict[str, set] = defaultdict(set)
    unknown, copies = [], []
    with ExitStack() as stack:
        handles: dict[str, object] = {}

        def read(name: str) -> torch.Tensor:
            shard = weight_map[name]
            try:
                if shard not in handles:
                    handles[shard] = stack.enter_context(safe_open(path / shard, "pt", device="cpu"))
                return handles[shard].get_tensor(name)
            except Exception as e:  # truncated/corrupt/missing shard: one clear line naming it
                raise ValueError(f"{path / shard}: cannot read {name} ({type(e).__name__}: {e})") from e

        for hf_name in weight_map:
            if hf_name.endswith(SCALE_SUFFIX):
                if hf_name.removesuffix(SCALE_SUFFIX) not in weight_map:
                    unknown.append(hf_name)
                continue
            target = place(hf_name, cfg, expected)
            if target is None:
                if read(hf_name).numel():  # transformers writes empty shared_experts.* when n_shared_experts is 0
                    unknown.append(hf_name)
                continue
            tensor = read(hf_name)
            scale_name = hf_name + SCALE_SUFFIX
            if tensor.dtype.is_floating_point and tensor.dtype.itemsize == 1 or scale_name in weight_map:
                scale = read(scale_name) if scale_name in weight_map else None
                tensor = dequantize_named(f"{path}: {hf_name}", tensor, scale, torch.float32)
            ref = expected[target.name]
            want_dtype = ref.dtype if ref.dtype == torch.float32 and target.name.endswith("gate.bias") else dtype
            if target.copy_of_shared:
                copies.append((hf_name, target.name, tensor))
                continue
            if target.expert is None:
                if tuple(tensor.shape) != tuple(ref.shape):
                    raise ValueError(f"{hf_name}: shape {tuple(tensor.shape)} does not fit {target.name} {tuple(ref.shape)}")
                loaded[target.name] = tensor.to(device=device, dtype=want_dtype)
                continue
            stacked = loaded.get(target.name)
            if stacked is None:
                stacked = loaded[target.name] = torch.empty(ref.shape, dtype=dtype, device=device)
            rows = ref.shape[1] // 2 if target.name.endswith("w13") else ref.shape[1]
            if tuple(tensor.shape) != (rows, ref.shape[2]):
                raise ValueError(f"{hf_name}: shape {tuple(tensor.shape)} does not fit an expert slice ({rows}, {ref.shape[2]})")
            stacked[target.expert, target.half * rows:(target.half + 1) * rows].copy_(tensor)
            expert_parts[target.name].add((target.expert, target.half))

    if unknown:
        raise ValueError(f"{path}: {len(unknown)} checkpoint tensors have no place in the model: {', '.join(sorted(unknown)[:10])}")
    halves = {"w13": 2, "w2": 1}
    incomplete = [n for n, parts in expert_parts.items() if len(parts) != cfg.n_routed_experts * halves[n.rsplit(".", 1)[1]]]
    missing = sorted(set(expected) - set(loaded)) + incomplete
    if missing:
        raise ValueError(f"{path}: {len(missing)} model tensors are missing from the checkpoint: {', '.join(missing[:10])}")
    for hf_name, shared, tensor in copies:  # the MTP layer's stored embedding/head must be the shared one
        if not torch.allclose(tensor.to(loaded[shared].dtype).to(device), loaded[shared], atol=1e-2, rtol=0):
            log.warning("%s differs from the shared %s; dsv3 shares one tensor and keeps the main model's", hf_name, shared)

    model.load_state_dict(loaded, strict=True, assign=True)
    model.rope.reset_parameters(device)
    return model.eval()


def _hf_tensors(model: Transformer):
    """Yields (HF name, tensor) for the whole model, per-expert slices and MTP copies included."""
    cfg = model.cfg
    state = model.state_dict()
    for name, tensor in state.items():
        for hf_name, target in dsv3_to_hf(name, cfg):
            if target.expert is None:
                yield hf_name, tensor
            else:
                rows = tensor.shape[1] // 2 if name.endswith("w13") else tensor.shape[1]
                yield hf_name, tensor[target.expert, target.half * rows:(target.half + 1) * rows]
    for hf_name, shared in mtp_copy_names(cfg):
        yield hf_name, state[shared]


def save_pretrained(model: Transformer, path: str | Path, dtype: torch.dtype | None = None, fp8: bool = False,
                    max_shard_bytes: int = 4 << 30, scale_fmt: str | None = None) -> None:
    """Writes `path` in the HF DeepSeek-V3 layout: config.json, `model-0000i-of-0000n.safetensors`, index.

    dtype: storage dtype of floating tensors (default: the model's); the routing bias stays fp32.
    fp8: store the linear weights the release stores in FP8 as e4m3 + 128x128 `weight_scale_inv`.
    scale_fmt: with fp8, "ue8m0" writes power-of-two scales and says so in quantization_config (V3.1's
    format: FP8 inference then scales activations by powers of two too); None: amax/448 scales (V3's)."""
    if scale_fmt not in (None, "ue8m0"):
        raise ValueError(f"scale_fmt must be None or 'ue8m0', got {scale_fmt!r}")
    path = Path(path)
    model_dtype = model.embed.weight.dtype
    dtype = dtype or model_dtype
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for hf_name, tensor in _hf_tensors(model):
        tensor = tensor.detach().to("cpu")
        if fp8 and is_fp8_linear(hf_name):
            q, s = quantize_weight(tensor, pow2=scale_fmt == "ue8m0")
            items = [(hf_name, q), (hf_name + SCALE_SUFFIX, s)]
        else:
            keep_fp32 = hf_name.endswith("e_score_correction_bias")
            items = [(hf_name, tensor.to(torch.float32 if keep_fp32 else dtype))]
        for name, t in items:
            nbytes = t.numel() * t.element_size()
            if size and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = t.contiguous().clone()  # own storage: safetensors refuses shared views
            size += nbytes

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        n = len(shards)
        weight_map, total = {}, 0
        for i, shard in enumerate(shards, start=1):
            fname = f"model-{i:05d}-of-{n:05d}.safetensors"
            save_file(shard, tmp / fname, metadata={"format": "pt"})
            for name, t in shard.items():
                weight_map[name] = fname
                total += t.numel() * t.element_size()
        (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        dtype_name = str(dtype).removeprefix("torch.")
        config = model.cfg.to_hf_config(torch_dtype=dtype_name)
        if fp8:
            config["quantization_config"] = dict(FP8_QUANT_CONFIG) | ({"scale_fmt": scale_fmt} if scale_fmt else {})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(new: Path, dest: Path) -> None:
    """Moves the freshly written checkpoint `new` to `dest`: one atomic rename for a new folder; for an
    existing one, its old weights/index/config are swapped out and other files (a tokenizer) are kept."""
    if not dest.exists():
        os.replace(new, dest)
        return
    for old in [*dest.glob("*.safetensors"), dest / INDEX_FILE, dest / "config.json"]:
        old.unlink(missing_ok=True)
    for f in new.iterdir():
        os.replace(f, dest / f.name)
    new.rmdir()
