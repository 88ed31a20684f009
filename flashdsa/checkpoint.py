"""Checkpoints in the official Hugging Face DeepSeek-V3.2 format: ``config.json`` plus
safetensors files with the HF parameter names (SPEC 6).

- One file ``model.safetensors``, or shards ``model-0000i-of-0000n.safetensors`` listed in
  ``model.safetensors.index.json`` (``{"weight_map": {name: file}}``), as the official
  release ships them.
- FP8 weights: an ``float8_e4m3fn`` tensor ``<name>.weight`` comes with
  ``<name>.weight_scale_inv`` (fp32, one scale per 128 x 128 block, shape
  [ceil(out / 128), ceil(in / 128)]); the real weight is ``w8 * scale_inv`` blockwise.
  They are dequantized on load.
- Entries for layers past ``num_hidden_layers`` (the multi-token-prediction layer of the
  official checkpoint, ``model.layers.61.*``) are skipped: this model has no MTP head.

Loading builds the model on the meta device and fills it tensor by tensor, so peak host
memory is one model plus one tensor, not two models.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch

from .config import DSAConfig

FP8_BLOCK = 128
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Linear weights the official release keeps in bf16: the router and the indexer head weights.
_NOT_FP8 = ("mlp.gate.weight", "indexer.weights_proj.weight")


def _safetensors():
    try:
        import safetensors.torch as st
        from safetensors import safe_open
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("reading or writing checkpoints needs the safetensors package: "
                          "pip install safetensors (or pip install 'flashdsa[checkpoint]')") from e
    return st, safe_open


def quantize_fp8_block(w: torch.Tensor, block: int = FP8_BLOCK):
    """FP8 e4m3 weight with one fp32 scale per ``block x block`` tile (the release format).

    w [out, in] -> (w8 [out, in] float8_e4m3fn, scale_inv [ceil(out/block), ceil(in/block)] fp32)
    with ``w ~= w8 * scale_inv`` tile by tile; scale_inv = amax(tile) / 448."""
    if w.dim() != 2:
        raise ValueError(f"w: expected a 2-d weight [out, in], got shape {tuple(w.shape)}")
    o, i = w.shape
    po, pi = math.ceil(o / block) * block, math.ceil(i / block) * block
    tiles = torch.zeros(po, pi, dtype=torch.float32, device=w.device)
    tiles[:o, :i] = w.float()
    tiles = tiles.view(po // block, block, pi // block, block)
    scale = tiles.abs().amax(dim=(1, 3)).clamp_min(1e-12) / 448.0             # [po/b, pi/b]
    w8 = (tiles / scale[:, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    return w8.view(po, pi)[:o, :i].contiguous(), scale


def dequantize_fp8_block(w8: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                         block: int = FP8_BLOCK) -> torch.Tensor:
    """Inverse of :func:`quantize_fp8_block`: w8 [out, in] e4m3 times its tile scales."""
    o, i = w8.shape
    want = (math.ceil(o / block), math.ceil(i / block))
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"weight_scale_inv: expected shape {list(want)} for an FP8 weight of shape "
                         f"{[o, i]} with {block} x {block} blocks, got {list(scale_inv.shape)}")
    s = scale_inv.float().repeat_interleave(block, 0)[:o].repeat_interleave(block, 1)[:, :i]
    return (w8.float() * s).to(dtype)


def _weight_files(path: Path) -> dict[str, Path]:
    """Map each tensor name to the safetensors file holding it."""
    _, safe_open = _safetensors()
    index = path / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: path / f for name, f in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no {INDEX_FILE} and no *.safetensors file")
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            out.update({k: f for k in h.keys()})
    return out


class _Reader:
    """Reads single tensors from a set of safetensors files, keeping files open."""

    def __init__(self, files: dict[str, Path]):
        _, self._safe_open = _safetensors()
        self.files, self._open = files, {}

    def get(self, name: str) -> torch.Tensor:
        f = self.files[name]
        if f not in self._open:
            self._open[f] = self._safe_open(str(f), framework="pt")
        return self._open[f].get_tensor(name)


def load_config(path: str | os.PathLike) -> DSAConfig:
    """DSAConfig from ``<path>/config.json``."""
    f = Path(path) / "config.json"
    if not f.exists():
        raise FileNotFoundError(f"{f}: no config.json (expected a Hugging Face model directory)")
    return DSAConfig.from_hf_config(json.loads(f.read_text()))


def _default_dtype(cfg: DSAConfig) -> torch.dtype:
    """The weights' dtype that config.json names: ``dtype`` (transformers 5) or ``torch_dtype``
    (the official release), float32 when neither is given."""
    key = "dtype" if cfg.extra.get("dtype") is not None else "torch_dtype"
    name = cfg.extra.get(key) or "float32"
    dt = getattr(torch, str(name).replace("torch.", ""), None)
    if not (isinstance(dt, torch.dtype) and dt.is_floating_point):
        raise ValueError(f"{key}: expected a floating torch dtype name such as 'bfloat16', got {name!r}")
    return dt


def from_pretrained(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    config: DSAConfig | None = None, strict: bool = True):
    """Load a :class:`flashdsa.model.DSAForCausalLM` from a Hugging Face directory.

    Args:
        path: directory with config.json and safetensors weights (single or sharded).
        device: where the parameters go.
        dtype: parameter dtype; default the config's ``dtype`` or ``torch_dtype`` (float32 if
            absent).
            FP8 weights are dequantized into it.
        config: use this config instead of config.json.
        strict: raise when a model parameter is missing from the checkpoint or the
            checkpoint has a tensor the model does not know (MTP layers excepted).
    """
    from .model import DSAForCausalLM

    path = Path(path)
    cfg = config if config is not None else load_config(path)
    dtype = dtype or _default_dtype(cfg)
    reader = _Reader(_weight_files(path))
    with torch.device("meta"):
        model = DSAForCausalLM(cfg, init=False)
    model.to_empty(device=device)
    model.to(dtype)
    model.tie_weights()
    model.reset_buffers()  # RoPE frequencies: recomputed, fp32 (not part of the checkpoint)
    for name, buf in list(model.named_buffers()):
        if name.endswith("e_score_correction_bias"):  # router bias stays fp32, as released
            owner = model.get_submodule(name.rsplit(".", 1)[0])
            owner.e_score_correction_bias = buf.float()

    targets = dict(model.named_parameters())
    targets.update({n: b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")})
    if cfg.tie_word_embeddings:
        targets.pop("lm_head.weight", None)
    missing = []
    with torch.no_grad():
        for name, dst in targets.items():
            if name not in reader.files:
                missing.append(name)
                continue
            t = reader.get(name)
            if t.dtype == torch.float8_e4m3fn:
                scale_name = name + "_scale_inv"
                if scale_name not in reader.files:
                    raise ValueError(f"{name}: FP8 weight without its {scale_name} block scales")
                t = dequantize_fp8_block(t, reader.get(scale_name), dtype=torch.float32)
            if tuple(t.shape) != tuple(dst.shape):
                raise ValueError(f"{name}: checkpoint shape {list(t.shape)} does not match the model's "
                                 f"{list(dst.shape)} built from config.json")
            dst.copy_(t)
    mtp = re.compile(r"model\.layers\.(\d+)\.")

    def skippable(n: str) -> bool:
        # consumed scales, an old rotary buffer, a tied head, and MTP layers past the last layer
        if n.endswith(("_scale_inv", "rotary_emb.inv_freq")) or (cfg.tie_word_embeddings and n == "lm_head.weight"):
            return True
        m = mtp.match(n)
        return m is not None and int(m.group(1)) >= cfg.num_hidden_layers

    unexpected = [n for n in reader.files if n not in targets and not skippable(n)]
    if strict and (missing or unexpected):
        raise KeyError(f"checkpoint {path} does not match the model: missing {missing[:8]}"
                       f"{'...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                       f"{'...' if len(unexpected) > 8 else ''}")
    return model


def _is_fp8_candidate(name: str, t: torch.Tensor) -> bool:
    return (t.dim() == 2 and name.startswith("model.layers.") and name.endswith(".weight")
            and not name.endswith(_NOT_FP8) and "layernorm" not in name and "norm." not in name)


def save_pretrained(model, path: str | os.PathLike, dtype: torch.dtype | None = None, fp8: bool = False,
                    max_shard_bytes: int = 5 * 2**30) -> None:
    """Write ``config.json`` and safetensors weights with Hugging Face names.

    Args:
        model: a :class:`flashdsa.model.DSAForCausalLM`.
        path: output directory (created).
        dtype: cast floating tensors to it (default: keep the model's dtype).
        fp8: store the layer linear weights as e4m3 with 128 x 128 ``weight_scale_inv``
            (the release format; the router and indexer head weights stay in ``dtype``).
        max_shard_bytes: above this, shards plus ``model.safetensors.index.json``.
    """
    st, _ = _safetensors()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    tensors = {}
    for name, t in model.state_dict().items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        t = t.detach().cpu()
        if fp8 and _is_fp8_candidate(name, t):
            tensors[name], tensors[name + "_scale_inv"] = quantize_fp8_block(t)
            continue
        if dtype is not None and t.is_floating_point() and not name.endswith("e_score_correction_bias"):
            t = t.to(dtype)
        tensors[name] = t.contiguous()

    hf = cfg.to_hf_config()
    hf.setdefault("architectures", ["DeepseekV32ForCausalLM"])
    stored = dtype or next(model.parameters()).dtype
    # transformers 5 reads ``dtype``, the official release and older readers ``torch_dtype``.
    hf["dtype"] = hf["torch_dtype"] = str(stored).replace("torch.", "")
    if fp8:
        hf["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                     "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
    else:
        hf.pop("quantization_config", None)
    (path / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")

    shards, size = [{}], 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    for old in list(path.glob("model*.safetensors")) + [path / INDEX_FILE]:
        if old.exists():
            old.unlink()
    meta = {"format": "pt"}
    if len(shards) == 1:
        st.save_file(shards[0], str(path / SINGLE_FILE), metadata=meta)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        st.save_file(shard, str(path / fname), metadata=meta)
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (path / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                              indent=2) + "\n")
