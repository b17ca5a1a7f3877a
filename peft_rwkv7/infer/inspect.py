"""`rwkv-peft inspect PATH`: what a file or folder of ours is, as a short readable summary (or JSON).

Knows models (official `.pth`, web-rwkv `.st`, HF RWKV-7 directories; older RWKV generations are named
as such), run directories, training checkpoints (one-process `.pt` files and DeepSpeed `step_N/`
folders) and binidx datasets (`PREFIX`, `PREFIX.bin` or `PREFIX.idx`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import UserError
from ..model import infer_config, read_state_dict
from ..run_dir import LOG_FILE, META_FILE, RECIPE_FILE, list_checkpoints, read_log


def describe_model(path: Path) -> dict:
    from ..model.formats import FORMAT_NAMES, detect_format

    sd = read_state_dict(path)
    cfg = infer_config(sd, str(path))
    return {
        "kind": "model", "path": str(path), "format": FORMAT_NAMES[detect_format(path)],
        "parameters": sum(t.numel() for k, t in sd.items() if not k.endswith("time_state")),
        "dtypes": sorted({str(t.dtype).replace("torch.", "") for t in sd.values()}),
        "config": cfg.to_dict(), "tuned_state": any(k.endswith("time_state") for k in sd),
    }


def _read_json(path: Path) -> dict:
    """A JSON object from `path` (adapter.json, a DeepSpeed checkpoint's meta.json); one line naming the file if not."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}), expected a JSON file") from None
    except json.JSONDecodeError as e:  # json's "Invalid control character at": we say where
        raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg.removesuffix(' at')} at column {e.colno})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _field(data: dict, key: str, kind: type | tuple[type, ...], where: str, default=None):
    """data[key] when it is a `kind` (bool is no number), `default` when absent or null; else one line naming it."""
    v = data.get(key)
    if v is None:
        return default
    if not isinstance(v, kind) or isinstance(v, bool):  # no caller asks for a bool
        raise UserError(f"{where}: {key} is {type(v).__name__} {v!r:.40}, not what rwkv-peft writes there")
    return v


def describe_run(path: Path) -> dict:
    info: dict = {"kind": "run", "path": str(path)}
    if (path / META_FILE).is_file():
        where = path / META_FILE
        meta = _read_json(where)
        method = _field(meta, "method", dict, where, {})
        info["method"] = {k: v for k, v in method.items() if _relevant(method, k)}
        info["trainable_parameters"] = _field(meta, "trainable_parameters", int, where)
        base = _field(meta, "base", dict, where, {})
        info["base"] = {k: base.get(k) for k in ("path", "fingerprint", "dtype")}
        ranks = _field(meta, "ranks", dict, where)
        if ranks is not None:  # AdaLoRA: {module: rank} after allocation
            if not all(isinstance(r, int) and not isinstance(r, bool) for r in ranks.values()):
                raise UserError(f"{where}: ranks holds a value that is not an integer")
            info["ranks"] = ranks
    if (path / RECIPE_FILE).is_file():
        info.update(_recipe_summary(path / RECIPE_FILE))
    if (path / LOG_FILE).is_file():
        records = read_log(path)  # only well-formed records
        steps = [r for r in records if "loss" in r]
        evals = [r for r in records if "eval_loss" in r]
        if steps:
            info["steps_done"], info["first_loss"], info["last_loss"] = steps[-1]["step"], steps[0]["loss"], \
                steps[-1]["loss"]
        if evals:
            info["eval_loss"] = evals[-1]["eval_loss"]
    info["checkpoints"] = [s for s, _ in list_checkpoints(path)]
    info["files"] = sorted(p.name for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    if len(info) == 4 and not info["checkpoints"]:
        raise UserError(f"{path}: not a run directory (no adapter.json, recipe.yaml, log.jsonl or checkpoints/)")
    return info


_ADAPTERS = ("lora", "pissa", "disha", "loha", "lokr", "oft", "boft", "ia3", "vera", "adalora")
# method keys -> the kinds that read them (adapter.json stores every key, the others at their defaults)
_READ_BY = {
    "r": tuple(k for k in _ADAPTERS if k != "ia3"),
    "alpha": ("lora", "pissa", "loha", "lokr", "adalora"),
    "dropout": ("lora", "pissa", "disha", "oft", "boft", "vera", "adalora"),
    "target_modules": _ADAPTERS,
    "svd_niter": ("pissa",),
    "disha_mode": ("disha",),
    "boft_factors": ("boft",),
    "adalora": ("adalora",),
}
# keys shown only when set (LoRA options and starts, quantization, extras); settings of one LoRA start
_WHEN_SET = ("use_dora", "use_rslora", "init", "quant", "train_parts", "state")
_OF_INIT = {"loftq_iters": "loftq", "eva_tokens": "eva"}


def _recipe_summary(path: Path) -> dict:
    """max_steps and the data path of a run's recipe.yaml (None where absent)."""
    import yaml

    try:
        recipe = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise UserError(f"{path}: not a readable YAML file ({type(e).__name__})") from None
    if not isinstance(recipe, dict):
        raise UserError(f"{path}: expected a YAML mapping, got {type(recipe).__name__}")
    train, data = _field(recipe, "train", dict, path, {}), _field(recipe, "data", dict, path, {})
    return {"max_steps": _field(train, "max_steps", int, f"{path}: train"),
            "data": _field(data, "path", str, f"{path}: data")}


def _relevant(method: dict, key: str) -> bool:
    """adapter.json keys that mean something for this method (no LoRA fields on a state run)."""
    if key in _READ_BY:
        return method.get("kind") in _READ_BY[key]
    if key in _WHEN_SET:
        return method.get(key) not in (None, False, "none", "default", [])
    if key in _OF_INIT:
        return method.get("init") == _OF_INIT[key]
    return True


def describe_checkpoint(path: Path) -> dict:
    if path.is_dir():  # DeepSpeed: step_N/ with meta.json and one shard per rank
        where = path / "meta.json"
        meta = _read_json(where)
        tensors = _field(meta, "tensors", (list, dict), where) or _field(meta, "params", (list, dict), where, [])
        return {"kind": "checkpoint", "path": str(path), "layout": "deepspeed",
                "step": _field(meta, "step", int, where), "processes": _field(meta, "world_size", int, where),
                "zero_stage": _field(meta, "zero_stage", int, where), "tensors": len(tensors)}
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"{path}: not a readable training checkpoint ({type(e).__name__})") from None
    if not isinstance(payload, dict):
        raise UserError(f"{path}: not a training checkpoint of rwkv-peft (it holds a {type(payload).__name__})")
    params = _field(payload, "params", dict, path)
    if params is None:
        raise UserError(f"{path}: not a training checkpoint of rwkv-peft (it holds no params)")
    if not all(isinstance(t, torch.Tensor) for t in params.values()):
        raise UserError(f"{path}: params holds a value that is not a tensor")
    return {"kind": "checkpoint", "path": str(path), "layout": "single process",
            "step": _field(payload, "step", int, path), "tensors": len(params),
            "trained_values": sum(t.numel() for t in params.values())}


def describe_binidx(path: Path) -> dict:
    from ..data.binidx import MMapIndexedDataset

    ds = MMapIndexedDataset(path)
    return {"kind": "binidx", "prefix": ds.prefix, "documents": len(ds.sizes), "tokens": int(ds.sizes.sum()),
            "dtype": str(ds.dtype), "largest_document": int(ds.sizes.max()) if len(ds.sizes) else 0}


def inspect(path: str) -> dict:
    """What `path` is, as a dict (see the module docstring)."""
    from ..model.formats import is_hf_dir

    p = Path(path)
    if p.suffix in (".bin", ".idx") or (not p.exists() and Path(f"{path}.idx").is_file()):
        return describe_binidx(p)
    if p.is_dir() and (p / "meta.json").is_file() and p.parent.name == "checkpoints":
        return describe_checkpoint(p)
    if p.is_dir() and not is_hf_dir(p):
        return describe_run(p)
    if p.suffix == ".pt" and p.parent.name == "checkpoints":
        return describe_checkpoint(p)
    return describe_model(p)


def render(info: dict) -> str:
    """The dict of `inspect` as a few readable lines."""
    kind = info["kind"]
    if kind == "model":
        c = info["config"]
        lines = [f"{info['path']}: RWKV-7 (x070) model, {info['parameters'] / 1e6:.2f}M parameters, "
                 f"{'/'.join(info['dtypes'])}",
                 f"  format: {info['format']}",
                 f"  layers {c['n_layer']}  n_embd {c['n_embd']}  heads {c['n_embd'] // c['head_size']} x "
                 f"{c['head_size']}  vocab {c['vocab_size']}",
                 f"  ffn {c['dim_ffn']}  low-rank w/a/v/g {c['d_decay']}/{c['d_aaa']}/{c['d_mv']}/{c['d_gate']}  "
                 f"layer-0 v0/v1/v2 {'present' if c['layer0_v'] else 'absent'}"]
        if info["tuned_state"]:
            lines.append("  carries a tuned initial state (att.time_state)")
        return "\n".join(lines)
    if kind == "run":
        lines = [f"{info['path']}: run directory"]
        if "method" in info:
            m = info["method"]
            shown = "  ".join(f"{k} {','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in m.items())
            lines.append(f"  method: {shown}")
            trains = "?" if info["trainable_parameters"] is None else f"{info['trainable_parameters']:,}"
            lines.append(f"  trains {trains} values; base {info['base']['path'] or '?'} "
                         f"(fingerprint {info['base']['fingerprint']})")
        if "ranks" in info:
            lines += _rank_lines(info["ranks"], info["method"].get("r"))
        if info.get("data"):
            lines.append(f"  data: {info['data']}")
        if "steps_done" in info:
            total = f" of {info['max_steps']}" if info.get("max_steps") else ""
            ev = f"  eval loss {info['eval_loss']:.4f}" if "eval_loss" in info else ""
            lines.append(f"  steps {info['steps_done']}{total}  loss {info['first_loss']:.4f} -> "
                         f"{info['last_loss']:.4f}{ev}")
        ck = info["checkpoints"]
        lines.append(f"  checkpoints at steps: {', '.join(map(str, ck))}" if ck else "  no checkpoints")
        lines.append(f"  files: {', '.join(info['files'])}")
        return "\n".join(lines)
    if kind == "checkpoint":
        extra = (f", {info['processes']} processes, ZeRO-{info['zero_stage']}" if info["layout"] == "deepspeed"
                 else f", {info['trained_values']:,} trained values")
        return (f"{info['path']}: training checkpoint ({info['layout']}) at step {info['step']}, "
                f"{info['tensors']} trained tensors{extra}; resume with rwkv-peft train RECIPE --resume")
    return (f"{info['prefix']}: binidx dataset, {info['documents']:,} documents, {info['tokens']:,} tokens "
            f"({info['dtype']}), the longest {info['largest_document']:,} tokens")


def _rank_lines(ranks: dict[str, int], start: int | None) -> list[str]:
    """AdaLoRA's allocated ranks: the total, then one line per block (`att.key 3, ...`) and one for the head."""
    of = f" of {start * len(ranks)} at the start (r {start})" if start else ""
    lines = [f"  ranks after allocation: {sum(ranks.values())} in {len(ranks)} matrices{of}"]
    groups: dict[str, list[str]] = {}
    for module, rank in ranks.items():
        if module.startswith("blocks."):
            block, _, proj = module.removeprefix("blocks.").partition(".")
            groups.setdefault(f"block {block}", []).append(f"{proj} {rank}")
        else:
            groups.setdefault(module, []).append(str(rank))
    return lines + [f"    {g}: {', '.join(parts)}" for g, parts in groups.items()]


def inspect_path(path: str, as_json: bool = False) -> str:
    info = inspect(path)
    return json.dumps(info) if as_json else render(info)
