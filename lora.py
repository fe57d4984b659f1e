"""lora.py: hand-written LoRA (torchtune's shape), merging it into full-precision weights, and
adapter files in PEFT's format.

    LoRALinear(base) = base(x) + (alpha / r) * B(A(dropout(x))),  A random, B zero

The base is any frozen linear: an nn.Linear, or quant.NF4Linear for QLoRA-style training on
a 4-bit copy. `add_lora` swaps the target linears of a built model.py Transformer;
`lora_params` names the trainable tensors, so saving an adapter is a filter, not a walk.
The merge adds (alpha / r) B A to the full-precision weights read from disk shard by shard
(never to the 4-bit copy, whose rounding would be baked in).
"""
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

import model as M
import quant
from machinery import files, kernels, loader


@dataclass
class LoRAConfig:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple = quant.LINEARS


class LoRALinear(nn.Module):
    """base(x) + (alpha / r) * B A dropout(x), with only A and B trainable.

    A starts as nn.Linear's default (kaiming-uniform, a = sqrt(5)) as in the LoRA reference
    code and PEFT, B at zero, so a fresh adapter leaves the model exactly as it was. A and B
    are kept in float32 whatever the base's compute dtype, so small updates are not lost.
    """

    def __init__(self, base, r, alpha, dropout=0.0):
        super().__init__()
        self.base, self.r, self.scaling = base, r, alpha / r
        dev = base.qweight.device if isinstance(base, quant.NF4Linear) else base.weight.device
        # A is drawn on the CPU, then moved: torch.manual_seed seeds every CUDA generator alike, so
        # drawn on each layer's device the second card's layers would repeat the first card's A
        # and the adapter would depend on the split.
        a = torch.empty(r, base.in_features, device="meta" if dev.type == "meta" else "cpu")
        if dev.type != "meta":
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_A = nn.Parameter(a.to(dev))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=dev))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def in_features(self):
        return self.base.in_features

    @property
    def out_features(self):
        return self.base.out_features

    def forward(self, x):
        y = self.base(x)
        x = self.dropout(x)
        if not torch.is_autocast_enabled(x.device.type):  # under autocast the linears cast for themselves
            x = x.to(self.lora_A.dtype)
        h = kernels.linear(kernels.linear(x, self.lora_A), self.lora_B)  # oneDNN on CPU in float32 (kernels.linear)
        return y + (self.scaling * h).to(y.dtype)

    def delta(self):
        """The dense update this adapter adds to the base weight: (alpha / r) B A."""
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())


def add_lora(model, cfg: LoRAConfig):
    """Wrap every target linear of the model in a LoRALinear; freeze everything else."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name, mod in list(model.named_modules()):
        for child, sub in list(mod.named_children()):
            if child in cfg.targets and isinstance(sub, (nn.Linear, quant.NF4Linear)):
                setattr(mod, child, LoRALinear(sub, cfg.r, cfg.alpha, cfg.dropout))
    return model


def lora_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_params(model):
    """The trainable tensors, by name: saving an adapter is a filter, not a walk."""
    return {n: p for n, p in model.named_parameters() if ".lora_A" in n or ".lora_B" in n}


# ----------------------------------------------------------------------------- merge

HF_EXTRA_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "chat_template.jinja", "tokenizer.model")


def merge_adapter(src_dir, adapter_dir, out_dir, cfg: LoRAConfig, dtype=None, on_shard=None):
    """merge_lora from files: the adapter in adapter_dir, read onto a weightless (meta) copy of
    src_dir's model, folded into src_dir's checkpoint."""
    with torch.device("meta"):
        skeleton = M.create(M.Config.from_hf(src_dir))
    add_lora(skeleton, cfg)
    load_adapter(skeleton, adapter_dir)
    return merge_lora(src_dir, skeleton, out_dir, dtype=dtype, on_shard=on_shard)


def merge_lora(src_dir, lora_model, out_dir, dtype=None, on_shard=None):
    """Write src_dir's checkpoint with W + (alpha/r) B A folded into every adapted weight.

    The sum uses the full-precision weights read from disk, shard by shard (never the 4-bit
    copy, whose rounding would be baked in), in float32, and is written in `dtype`, by default
    each tensor's own (a bf16 checkpoint stays bf16: half the disk of float32). config.json says
    the dtype in both generations' keys (torch_dtype, and dtype for transformers 5), so
    from_pretrained(dtype="auto") loads it as written. The folder appears whole or not at all.
    on_shard(file) is called after each shard is written (progress, tests' kill points).
    """
    from safetensors import safe_open
    from safetensors.torch import save_file
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    deltas = {name + ".weight": m for name, m in lora_modules(lora_model).items()}
    weight_map, total, used, written = {}, 0, set(), {}
    with files.atomic(out_dir, folder=True) as tmp:
        for file in loader.checkpoint_files(src_dir):
            tensors = {}
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    t = f.get_tensor(name)
                    key, out_dtype = loader.hf_name(name), dtype or t.dtype
                    if key in deltas:
                        t = t.float() + deltas[key].delta().to(t.device)
                        used.add(key)
                    t = t.to(out_dtype).contiguous()
                    written[t.dtype] = written.get(t.dtype, 0) + t.numel()
                    tensors[name] = t
                    weight_map[name] = file.name
                    total += t.numel() * t.element_size()
            save_file(tensors, str(tmp / file.name), metadata={"format": "pt"})
            del tensors
            if on_shard is not None:
                on_shard(file)
        if used != set(deltas):
            raise M.ModelError(f"{src_dir}: adapter targets missing from the checkpoint: {sorted(set(deltas) - used)[:3]}")
        if (src_dir / "model.safetensors.index.json").exists():
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        for name in HF_EXTRA_FILES:
            if (src_dir / name).exists():
                shutil.copy(src_dir / name, tmp / name)
        cfg = json.loads((tmp / "config.json").read_text())
        cfg["torch_dtype"] = cfg["dtype"] = str(max(written, key=written.get)).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    return out_dir


def merged_bytes(src_dir, dtype=None):
    """Bytes merge_lora writes for src_dir's checkpoint, from the shards' headers alone; in a
    folder with config.json but no weights (`--plan` for a model not downloaded yet), from the
    config's shapes in its torch_dtype (transformers' default float32 when it names none)."""
    from safetensors import safe_open
    src_dir = Path(src_dir)
    if not any((src_dir / f).exists() for f in ("model.safetensors", "model.safetensors.index.json")):
        with torch.device("meta"):
            n = sum(p.numel() for p in M.create(M.Config.from_hf(src_dir)).parameters())  # a tied head once
        named = loader.read_json_object(src_dir / "config.json")
        named = named.get("torch_dtype") or named.get("dtype")
        return n * torch.finfo(dtype or CONFIG_DTYPES.get(named, torch.float32)).bits // 8
    n = 0
    for file in loader.checkpoint_files(src_dir):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                t = f.get_slice(name)
                size = torch.finfo(dtype).bits // 8 if dtype else DTYPE_BYTES[t.get_dtype()]
                n += size * math.prod(t.get_shape())
    return n


CONFIG_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


# ----------------------------------------------------------------------------- PEFT adapter files

PEFT_PREFIX = "base_model.model.model."  # PeftModel > LlamaForCausalLM > LlamaModel


def save_adapter(model, cfg: LoRAConfig, out_dir, base_path=""):
    """adapter_config.json + adapter_model.safetensors exactly as PEFT writes them, so
    peft.PeftModel.from_pretrained(transformers_model, out_dir) loads our adapter."""
    from safetensors.torch import save_file
    out_dir = Path(out_dir)
    tensors = {}
    for name, m in lora_modules(model).items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.detach().float().cpu().contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.detach().float().cpu().contiguous()
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.r, "lora_alpha": cfg.alpha,
              "lora_dropout": cfg.dropout, "target_modules": sorted(cfg.targets), "bias": "none",
              "base_model_name_or_path": str(base_path), "fan_in_fan_out": False, "inference_mode": True,
              "init_lora_weights": True, "modules_to_save": None, "use_rslora": False, "use_dora": False}
    with files.atomic(out_dir, folder=True) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))


def load_adapter(model, adapter_dir):
    """Load PEFT-format LoRA weights into a model that add_lora() prepared with the same config."""
    from safetensors.torch import load_file
    adapter_dir = Path(adapter_dir)
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    mods = lora_modules(model)
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    for key, t in tensors.items():
        name, _, leaf = key.removeprefix(PEFT_PREFIX).rpartition(".")  # ...q_proj.lora_A, weight
        mod_name, _, which = name.rpartition(".")
        if mod_name not in mods or which not in ("lora_A", "lora_B"):
            raise M.ModelError(f"{adapter_dir}/adapter_model.safetensors: unexpected tensor {key}")
        m = mods[mod_name]
        if m.r != cfg["r"] or not math.isclose(m.scaling, cfg["lora_alpha"] / cfg["r"]):
            raise M.ModelError(f"{adapter_dir}/adapter_config.json: r/alpha differ from the model's LoRA")
        cur = getattr(m, which)
        if tuple(cur.shape) != tuple(t.shape):
            raise M.ModelError(f"{adapter_dir}: tensor {key} has shape {tuple(t.shape)}, expected {tuple(cur.shape)}")
        setattr(m, which, nn.Parameter(t.to(device=cur.device if cur.device.type != "meta" else "cpu",
                                            dtype=torch.float32), requires_grad=cur.requires_grad))
    if len(tensors) != 2 * len(mods):
        raise M.ModelError(f"{adapter_dir}: adapter has {len(tensors)} tensors, the model has {2 * len(mods)} LoRA tensors")
    return model
