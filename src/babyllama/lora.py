"""LoRA adapters on the Transformer, with Hugging Face peft (Hu et al., 2021): add, save, load, merge.

    config = lora_config(rank=16, alpha=32, dropout=0.05, targets="wqkv,wo,w13,w2")
    model = add_lora(model, config)         # the base frozen; W x + (alpha / r) B A x on each target
    tensors = adapter_tensors(model)        # peft's names: base_model.model.layers.0.attention.wqkv.lora_A.weight
    save_adapter(ckpt_dir, config, tensors, base="/abs/path/of/the/base/checkpoint")
    model = merge_lora(load_adapter(base_model, ckpt_dir))    # a plain Transformer again

A LoRA checkpoint holds peft's own files, adapter_config.json (its base_model_name_or_path names
the base checkpoint) and adapter_model.safetensors, under the names peft's PeftModel.save_pretrained
writes, so `PeftModel.from_pretrained(Transformer(cfg), ckpt_dir)` reads it too. Targets are the
linear layers of the blocks; the output head is shared with the embedding, so it is never a target.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from pathlib import Path

import torch

from babyllama.errors import UserError, require
from babyllama.model import ModelConfig, Transformer, real, whole
from babyllama.weights_file import read_safetensors, save_safetensors

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILE = "adapter_model.safetensors"
TARGETS = ("wqkv", "wo", "w13", "w2")  # the linear layers of every block (attention, then feed-forward)
PREFIX = "base_model.model."  # what PeftModel puts before the module names in adapter_model.safetensors
# adapter_config.json's fields that babyllama writes as peft's defaults: other values change the layers peft builds
# or how it scales them, or break it (fan_in_fan_out true: peft sets it back to false on our layers, with a warning)
PEFT_DEFAULTS = (
    "peft_type", "bias", "lora_bias", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern",
    "layers_to_transform", "layers_pattern", "exclude_modules", "modules_to_save", "layer_replication",
    "init_lora_weights", "target_parameters", "trainable_token_indices", "fan_in_fan_out",
)
# the fields a file must have: babyllama reads the first four, peft's PeftModel.from_pretrained peft_type (a KeyError)
REQUIRED = ("r", "lora_alpha", "lora_dropout", "target_modules", "peft_type")
ADAPTER_TENSOR = re.compile(rf"{re.escape(PREFIX)}layers\.\d+\.\w+\.({'|'.join(TARGETS)})\.lora_([AB])\.weight")


def lora_config(rank: int, alpha: float, dropout: float, targets: str, base: str | None = None):
    """peft's LoraConfig for the comma-separated `targets` among TARGETS; UserError for settings out of range."""
    peft = require("peft", "lora")
    names = [t.strip() for t in targets.split(",")] if targets.strip() else []
    if len(names) > 1 and names[-1] == "" and "" not in names[:-1]:  # `wqkv,wo,`: kept refused, the remedy said
        raise UserError(f"lora_targets {targets!r} ends in a comma; remove the trailing comma "
                        f"({targets.strip().removesuffix(',')}).")
    if "" in names:
        raise UserError(f"lora_targets {targets!r} has an empty item; separate the layers with one comma each, e.g. "
                        "wqkv,wo.")
    if twice := sorted({t for t in names if names.count(t) > 1}):
        raise UserError(f"lora_targets {targets!r} names {', '.join(twice)} twice; name each layer once.")
    unknown = sorted(set(names) - set(TARGETS))
    if rank < 1 or alpha <= 0 or not 0 <= dropout < 1 or not names or unknown:
        raise UserError(f"LoRA needs lora_rank >= 1, lora_alpha > 0, lora_dropout in [0, 1) and lora_targets among "
                        f"{','.join(TARGETS)}; got rank {rank}, alpha {alpha}, dropout {dropout}, targets {targets!r}.")
    return peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=names,
                           base_model_name_or_path=base)


def target_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each of TARGETS, the linear layers of every block of a model of cfg."""
    heads = cfg.n_heads * cfg.head_dim
    return {"wqkv": (cfg.dim, heads + 2 * cfg.kv_heads * cfg.head_dim), "wo": (heads, cfg.dim),
            "w13": (cfg.dim, 2 * cfg.ffn_dim), "w2": (cfg.ffn_dim, cfg.dim)}


def check_rank(config, cfg: ModelConfig) -> None:
    """UserError when config's rank exceeds min(in_features, out_features) of a target layer of a model of cfg:
    B A would be no lower rank than the layer itself, and cost more parameters (--lora_rank 100000 on the demo
    model allocated 19.5 GB before it was killed)."""
    shapes = target_shapes(cfg)
    name = min(sorted(config.target_modules), key=lambda k: min(shapes[k]))
    most = min(shapes[name])
    if config.r > most:
        raise UserError(f"lora_rank {config.r} is more than {most}, the smaller side of target {name} "
                        f"({' x '.join(map(str, shapes[name]))}), so the adapter would not be low-rank; choose "
                        f"lora_rank {most} or less.")


def adapter_params(config, cfg: ModelConfig) -> int:
    """The parameters of config's adapters on a model of cfg: r (in_features + out_features) for A (r, in) and
    B (out, r) of each target layer of each block (Hu et al., 2021)."""
    shapes = target_shapes(cfg)
    return cfg.n_layers * sum(config.r * sum(shapes[name]) for name in config.target_modules)


def add_lora(model: Transformer, config) -> Transformer:
    """The model with LoRA layers on its targets, in place: lora_A random (kaiming, from torch's RNG),
    lora_B zero, so the model computes what it did; only the adapters' parameters require grad."""
    from peft import inject_adapter_in_model

    model = inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


def adapter_tensors(model: Transformer, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The adapter's tensors of model (or of state_dict, e.g. the weight average), on the CPU, under peft's names."""
    from peft import get_peft_model_state_dict

    tensors = get_peft_model_state_dict(model, state_dict=state_dict)
    return {PREFIX + k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def save_adapter(out: Path, config, tensors: dict[str, torch.Tensor], base: str) -> None:
    """adapter_config.json (naming base) and adapter_model.safetensors in out/."""
    config = copy.copy(config)
    config.base_model_name_or_path = base
    save_lora_config(config, out)
    save_safetensors(tensors, out / ADAPTER_FILE)


def save_lora_config(config, out: Path) -> None:
    """out/adapter_config.json as peft's LoraConfig.save_pretrained writes it (out made if missing), but with its
    sets (target_modules) as sorted lists: peft writes a set in its iteration order, which PYTHONHASHSEED changes,
    so that one config gave files that differ from one process to the next."""
    data = {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    (out / ADAPTER_CONFIG).write_text(json.dumps(data, indent=2, sort_keys=True))


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_config(path: str | Path):
    """The LoraConfig of a LoRA checkpoint, its fields checked first (check_adapter_fields); UserError when it is no
    LoRA adapter peft can read and babyllama can load. A UTF-8 byte-order mark is skipped, and keys that this peft's
    LoraConfig does not have (a newer peft's, one added by hand) are left out, as peft leaves them out (with a
    warning that names its own file), as is runtime_config, which peft drops from a file too."""
    peft = require("peft", "lora")
    f = Path(path) / ADAPTER_CONFIG
    try:
        data = json.loads(f.read_bytes().decode("utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{f} is not a LoRA adapter config ({e}).") from None
    check_adapter_fields(data, f, peft.LoraConfig())
    known = {field.name for field in dataclasses.fields(peft.LoraConfig) if field.init} - {"runtime_config"}
    try:
        config = peft.LoraConfig(**{k: v for k, v in data.items() if k in known})
    except (ValueError, TypeError) as e:
        raise UserError(f"{f} is not a LoRA adapter config ({e}).") from None
    return config


def check_adapter_fields(data, f: Path, defaults) -> None:
    """UserError naming the file f and the field when adapter_config.json's data (its JSON) is no object, or its
    r, lora_alpha, lora_dropout or target_modules are not what lora_config accepts (a value of another type or out of
    range, targets other than TARGETS, the layers every model has), or one of PEFT_DEFAULTS is not peft's default
    (defaults: a LoraConfig()), or one of REQUIRED is missing: each made peft fail with a traceback, or build layers
    its weights do not fit."""
    if not isinstance(data, dict):
        raise UserError(f"{f} is not a LoRA adapter config (it holds {type(data).__name__}, not a JSON object).")
    r, alpha, dropout, targets = (data.get(k) for k in ("r", "lora_alpha", "lora_dropout", "target_modules"))
    checks = {
        "r": (whole(r) and r >= 1, "a whole number >= 1"),
        "lora_alpha": (real(alpha) and alpha > 0, "a number > 0"),
        "lora_dropout": (real(dropout) and 0 <= dropout < 1, "a number in [0, 1)"),
        "target_modules": (isinstance(targets, list) and targets and all(t in TARGETS for t in targets),
                           f"a list of layers among {', '.join(TARGETS)}"),
        **{k: (data.get(k) == getattr(defaults, k), f"peft's default {json.dumps(getattr(defaults, k))}")
           for k in PEFT_DEFAULTS if (k in data or k in REQUIRED) and hasattr(defaults, k)},
    }
    for name, (ok, wanted) in checks.items():
        if not ok:
            got = f"not {json.dumps(data[name], ensure_ascii=False)}" if name in data else "but it is missing"
            raise UserError(f"{f}: {name} must be {wanted}, {got}; the LoRA checkpoint is damaged.")


def check_adapter_shapes(config, shapes: dict[str, tuple[int, ...]], path: Path) -> None:
    """UserError naming adapter_config.json's field when the tensors of the adapter at path (shapes: {name: shape},
    of its adapter_model.safetensors) are of other layers than its target_modules, or of another rank than its r
    (lora_A (r, in), lora_B (out, r), one rank for all): peft would build layers they do not fit, or resume them
    silently. Tensors of other names or shapes, or of several ranks (transposed ones), are left to load_adapter,
    which finds them not to fit the model."""
    layers: dict[str, set[int]] = {}  # target -> the ranks of its tensors
    for name, shape in shapes.items():
        if (m := ADAPTER_TENSOR.fullmatch(name)) and len(shape) == 2:
            layers.setdefault(m[1], set()).add(shape[0] if m[2] == "A" else shape[1])
    f, weights = path / ADAPTER_CONFIG, path / ADAPTER_FILE
    if layers and set(layers) != set(config.target_modules):
        listed, held = ([t for t in TARGETS if t in names] for names in (config.target_modules, layers))
        raise UserError(f"{f}: target_modules lists {', '.join(listed)}, but {weights} holds adapters of "
                        f"{', '.join(held)}; the LoRA checkpoint is damaged.")
    ranks = set().union(*layers.values())
    if len(ranks) == 1 and ranks != {config.r}:  # tensors of several ranks: the file is damaged, not the config
        raise UserError(f"{f}: r is {config.r}, but the adapters in {weights} have rank {ranks.pop()}; the LoRA "
                        "checkpoint is damaged.")


def load_adapter(model: Transformer, path: str | Path) -> Transformer:
    """model with the adapter of checkpoint `path`, its LoRA layers added first unless it has them (a resume);
    torch's RNG is left as it was.

    Raises UserError when the adapter's tensors do not fit the model (another base, a damaged file), cannot be read
    or are not finite (read_safetensors).
    """
    from peft import set_peft_model_state_dict

    path = Path(path)
    if not _adapter_params(model):  # lora_A's random start is overwritten below, so the draw is undone: a resumed
        device = model.tok_embeddings.weight.device  # DPO run loads its reference again, and its dropout must not move
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            model = add_lora(model, adapter_config(path))
    tensors = read_safetensors(path / ADAPTER_FILE, str(model.tok_embeddings.weight.device))
    params = _adapter_params(model)
    if set(tensors) != set(params) or any(tensors[k].shape != p.shape for k, p in params.items()):
        raise UserError(f"{path / ADAPTER_FILE} does not fit the model it is loaded onto (other targets, rank or "
                        "base shapes).")
    set_peft_model_state_dict(model, {k.removeprefix(PREFIX): v for k, v in tensors.items()})
    return model


def _adapter_params(model: Transformer) -> dict[str, torch.Tensor]:
    """The adapter's parameters under the names of its file."""
    return {PREFIX + k.replace(".default", ""): p for k, p in model.named_parameters() if "lora_" in k}


@torch.no_grad()
def merge_lora(model: Transformer) -> Transformer:
    """The plain Transformer: every LoRA layer's W + (alpha / r) B A written into its base layer (peft's
    merge), which then takes the LoRA layer's place."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
    del model.peft_config  # what inject_adapter_in_model set: the model has no adapter now
    for p in model.parameters():
        p.requires_grad_(True)
    return model
