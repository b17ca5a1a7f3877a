"""`rwkv-peft inspect`: a model's config or a run directory's summary, as text."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from ..model import infer_config, read_state_dict


def _describe_model(path: Path) -> str:
    from ..model.formats import FORMAT_NAMES, detect_format

    sd = read_state_dict(path)
    cfg = infer_config(sd, str(path))
    n_params = sum(t.numel() for k, t in sd.items() if not k.endswith("time_state"))
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in sd.values()})
    lines = [
        f"{path}: RWKV-7 (x070), {n_params / 1e6:.2f}M parameters, {'/'.join(dtypes)}",
        f"  format: {FORMAT_NAMES[detect_format(path)]}",
        f"  layers {cfg.n_layer}  n_embd {cfg.n_embd}  heads {cfg.n_head} x {cfg.head_size}  vocab {cfg.vocab_size}",
        f"  ffn {cfg.dim_ffn}  low-rank w/a/v/g {cfg.d_decay}/{cfg.d_aaa}/{cfg.d_mv}/{cfg.d_gate}"
        f"  layer-0 v0/v1/v2 {'present' if cfg.layer0_v else 'absent'}",
    ]
    if any(k.endswith("time_state") for k in sd):
        lines.append("  carries a tuned initial state (att.time_state)")
    return "\n".join(lines)


def _describe_run(path: Path) -> str:
    lines = [f"{path}: run directory"]
    meta = path / "adapter.json"
    if meta.exists():
        try:
            info = json.loads(meta.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{meta}: invalid JSON ({e.msg} at line {e.lineno})") from None
        shown = {k: v for k, v in info.items() if k not in ("fingerprint", "tensors")}
        lines.append("  adapter: " + json.dumps(shown))
    log = path / "log.jsonl"
    if log.exists():
        records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        steps = [r for r in records if "loss" in r and "step" in r]
        if steps:
            first, last = steps[0], steps[-1]
            lines.append(f"  steps {last['step']}  first loss {first['loss']:.4f}  last loss {last['loss']:.4f}")
    ckpt = path / "checkpoints"
    if ckpt.is_dir():
        names = sorted(p.name for p in ckpt.iterdir() if not p.name.startswith("."))
        lines.append(f"  checkpoints: {', '.join(names) if names else 'none'}")
    if len(lines) == 1:
        raise UserError(f"{path}: not a run directory (no adapter.json, log.jsonl or checkpoints/)")
    return "\n".join(lines)


def inspect_path(path: str) -> str:
    from ..model.formats import is_hf_dir

    p = Path(path)
    if p.is_dir() and not is_hf_dir(p):
        return _describe_run(p)
    return _describe_model(p)
