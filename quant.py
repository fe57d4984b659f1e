"""quant.py: 4-bit (NF4) frozen base weights, hand-written LoRA, merging, PEFT-format adapters.

Applied to a built model.py Transformer as module swaps (gpt-fast style): model.py knows
nothing of quantization. The 4-bit format and kernels are bitsandbytes'; LoRA is ours
(torchtune's shape: base(x) + (alpha / r) * B(A(dropout(x))), A random, B zero).

    python quant.py --report   # bytes of weights (SmolLM2, Llama-3-8B shapes) and CPU speed
"""
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

# On AVX512-BF16 CPUs bitsandbytes tries to fetch an optional kernel from the Hugging Face hub
# at import and warns when it can't; we never want a download, and the fallback is fine.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

import bitsandbytes as bnb  # noqa: E402
import bitsandbytes.functional as bnbf  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import model as M  # noqa: E402

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ----------------------------------------------------------------------------- 4-bit linear

class NF4Linear(nn.Module):
    """A frozen linear layer stored in 4 bits (bitsandbytes NF4, blocks of 64, double quant).

    We call bnb.matmul_4bit on the packed weight ourselves instead of using bnb.nn.Linear4bit:
    on CPUs with AVX512-BF16, Linear4bit in eval mode repacks its weight into another layout,
    and a backward after that silently yields no input gradient (LoRA would stop learning).
    """

    def __init__(self, weight, compute_dtype=torch.float32, quant_type="nf4", double_quant=True, blocksize=64):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.compute_dtype = compute_dtype
        q, self.quant_state = bnbf.quantize_4bit(weight.contiguous(), blocksize=blocksize,
                                                 compress_statistics=double_quant, quant_type=quant_type)
        self.register_buffer("qweight", q)  # a buffer: frozen, never seen by the optimizer

    def forward(self, x):
        y = bnb.matmul_4bit(x.to(self.compute_dtype), self.qweight.t(), quant_state=self.quant_state)
        return y.to(x.dtype)

    def dequantize(self):
        return bnbf.dequantize_4bit(self.qweight, self.quant_state)

    def nbytes(self):
        qs = self.quant_state
        n = self.qweight.numel() * self.qweight.element_size() + qs.absmax.numel() * qs.absmax.element_size()
        n += qs.code.numel() * qs.code.element_size()
        if qs.nested:  # double quant: absmax itself stored in 8 bits with its own fp32 scales
            n += qs.state2.absmax.numel() * 4 + qs.state2.code.numel() * 4
        return n


# ----------------------------------------------------------------------------- LoRA

@dataclass
class LoRAConfig:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple = LINEARS


class LoRALinear(nn.Module):
    """base(x) + (alpha / r) * B A dropout(x), with only A and B trainable.

    A starts as nn.Linear's default (kaiming-uniform, a = sqrt(5)) as in the LoRA reference
    code and PEFT, B at zero, so a fresh adapter leaves the model exactly as it was. A and B
    are kept in float32 whatever the base's compute dtype, so small updates are not lost.
    """

    def __init__(self, base, r, alpha, dropout=0.0):
        super().__init__()
        self.base, self.r, self.scaling = base, r, alpha / r
        dev = base.qweight.device if isinstance(base, NF4Linear) else base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=dev))
        if dev.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False  # True: the plain base layer (e.g. the reference model)

    @property
    def in_features(self):
        return self.base.in_features

    @property
    def out_features(self):
        return self.base.out_features

    def forward(self, x):
        y = self.base(x)
        if self.disabled:
            return y
        h = F.linear(F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A), self.lora_B)
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
            if child in cfg.targets and isinstance(sub, (nn.Linear, NF4Linear)):
                setattr(mod, child, LoRALinear(sub, cfg.r, cfg.alpha, cfg.dropout))
    return model


def lora_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_params(model):
    """The trainable tensors, by name: saving an adapter is a filter, not a walk."""
    return {n: p for n, p in model.named_parameters() if ".lora_A" in n or ".lora_B" in n}


def set_lora_enabled(model, on):
    for m in lora_modules(model).values():
        m.disabled = not on


def enable_checkpointing(model):
    """Recompute each block's activations in backward instead of keeping them (memory for time)."""
    from torch.utils.checkpoint import checkpoint
    for block in model.layers:
        fwd = block.forward
        block.forward = lambda *a, _f=fwd, **k: checkpoint(_f, *a, use_reentrant=False, **k)


# ----------------------------------------------------------------------------- quantized loading

def quantize_model(path, compute_dtype=torch.float32, device="cpu", quant_type="nf4", double_quant=True,
                   targets=LINEARS):
    """Our Transformer with its target linears in 4 bits, quantized as the checkpoint streams in:
    each weight is quantized the moment it arrives, so full precision never sits in memory."""
    cfg = M.Config.from_hf(path)
    with torch.device("meta"):
        model = M.Transformer(cfg)

    def convert(key, t, dev):
        mod_name, _, leaf = key.rpartition(".")
        parent, _, child = mod_name.rpartition(".")
        if leaf != "weight" or child not in targets:
            return False
        w = t.to(device=dev, dtype=compute_dtype if compute_dtype != torch.float32 else t.dtype)
        setattr(model.get_submodule(parent), child, NF4Linear(w, compute_dtype, quant_type, double_quant))
        return True

    M.load_state(model, path, compute_dtype, device, convert)
    return model.eval()


def weight_bytes(model):
    """Bytes the model's weights hold: 4-bit data with its quant states, and the rest."""
    seen, n = set(), 0
    for mod in model.modules():
        if isinstance(mod, NF4Linear):
            n += mod.nbytes()
            seen.add(mod.qweight.data_ptr())
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type != "meta" and t.data_ptr() not in seen and t is not getattr(model, "inv_freq", None):
            seen.add(t.data_ptr())
            n += t.numel() * t.element_size()
    return n


# ----------------------------------------------------------------------------- merge

HF_EXTRA_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "chat_template.jinja", "tokenizer.model")


def merge_lora(src_dir, lora_model, out_dir, dtype=None, on_shard=None):
    """Write src_dir's checkpoint with W + (alpha/r) B A folded into every adapted weight.

    The sum uses the full-precision weights read from disk, shard by shard (never the 4-bit
    copy, whose rounding would be baked in), and the folder appears whole or not at all.
    on_shard(file) is called after each shard is written (progress, tests' kill points).
    """
    from safetensors import safe_open
    from safetensors.torch import save_file
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    deltas = {name + ".weight": m for name, m in lora_modules(lora_model).items()}
    tmp = out_dir.with_name(f"{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weight_map, total, used = {}, 0, set()
    for file in M.checkpoint_files(src_dir):
        tensors = {}
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                key = M.hf_name(name)
                if key in deltas:
                    t = t.float() + deltas[key].delta().to(t.device)
                    used.add(key)
                t = t.to(dtype or t.dtype).contiguous()
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
    if dtype is not None:
        cfg = json.loads((tmp / "config.json").read_text())
        cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


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
    tmp = out_dir.with_name(f"{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)


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


# ----------------------------------------------------------------------------- report

def shape_bytes(cfg: M.Config, r=16, targets=LINEARS):
    """(bf16 bytes, NF4 + LoRA bytes) of a model's weights from its shapes alone (meta device)."""
    with torch.device("meta"):
        m = M.Transformer(cfg)
    bf16 = nf4 = 0
    for name, p in m.named_parameters():
        n = p.numel()
        bf16 += 2 * n
        if name.rsplit(".", 2)[-2] in targets:
            out_f, in_f = p.shape
            # 4 bits per weight + one 8-bit absmax per 64 + one fp32 scale per 256 absmaxes + LoRA in fp32
            nf4 += n // 2 + n // 64 + 4 * math.ceil(n / 64 / 256) + 4 * r * (in_f + out_f)
        else:
            nf4 += 2 * n
    return bf16, nf4


def report():
    import time
    llama3 = M.Config(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
                      ffn_dim=14336, rope_theta=500000.0)
    smol_dir = M.embedded_model_dir()
    smol = M.Config.from_hf(smol_dir)
    print("| model | bf16 weights | NF4 + LoRA r=16 |\n|---|---|---|")
    for label, cfg in (("SmolLM2-135M", smol), ("Llama-3-8B shapes", llama3)):
        a, b = shape_bytes(cfg)
        print(f"| {label} | {a / 2**20:,.0f} MiB | {b / 2**20:,.0f} MiB |")
    m = quantize_model(smol_dir)
    add_lora(m, LoRAConfig())
    print(f"measured, SmolLM2 loaded as NF4 + LoRA: {weight_bytes(m) / 2**20:,.0f} MiB")
    m.train()
    ids = torch.randint(0, smol.vocab_size, (4, 128))
    for i in range(3):
        t = time.time()
        m(ids).float().logsumexp(-1).mean().backward()
        dt = time.time() - t
    print(f"forward+backward, batch 4 x 128 tokens, CPU {torch.get_num_threads()} threads: {4 * 128 / dt:,.0f} tokens/s")


if __name__ == "__main__":
    import sys
    if "--report" in sys.argv:
        report()
    else:
        print(__doc__)
