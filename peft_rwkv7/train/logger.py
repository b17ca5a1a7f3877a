"""Run output besides checkpoints: recipe.yaml, log.jsonl, progress bar, wandb, loss-curve PNG."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from ..model import atomic_write
from ..run_dir import LOG_FILE, PLOT_FILE, RECIPE_FILE, read_log
from .recipe import Recipe, dump_recipe


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


class RunLogger:
    """Writes one JSON record per step to log.jsonl and mirrors it to the progress bar and wandb.

    On resume, records after the resumed step (from a run that was cut short) are dropped first so
    the log reads like one uninterrupted run."""

    def __init__(self, out_dir: Path, recipe: Recipe, resume_step: int = 0, enabled: bool = True):
        self.out_dir, self.enabled = Path(out_dir), enabled
        self.total = recipe.train.max_steps
        self.records: list[dict] = []
        self.bar = self.wandb_run = self.file = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out_dir / RECIPE_FILE, dump_recipe(recipe))
        log = self.out_dir / LOG_FILE
        if resume_step and log.exists():  # a line cut short by the kill, or broken, is dropped too
            # and the final eval (at max_steps, only written by the run's end): a resume that finishes a run cut short
            # in its end writes it again
            self.records = [r for r in read_log(self.out_dir) if r["step"] <= resume_step
                            and not (r["step"] >= self.total and any(k.startswith("eval_") for k in r))]
            atomic_write_text(log, "".join(json.dumps(r) + "\n" for r in self.records))
        elif log.exists():
            log.unlink()
        self.file = open(log, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run
        if recipe.log.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=resume_step, unit="step", file=sys.stderr, dynamic_ncols=True)
        if recipe.log.wandb != "off":
            import wandb

            self.wandb_run = wandb.init(project=recipe.log.project, mode=recipe.log.wandb, dir=str(self.out_dir),
                                        config=json.loads(json.dumps(_plain(recipe))), resume="allow")

    def _write(self, record: dict) -> None:
        record["time"] = round(time.time(), 2)  # wall clock: the web UI's ETA and a resumed run's gaps
        self.records.append(record)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if k not in ("step", "time")}, step=record["step"])

    def step(self, step: int, loss: float, lr: float, tokens: float, seconds: float, extra: dict | None = None
             ) -> None:
        """One step's record. `tokens`: the positions the model ran over all ranks (a padded batch's unscored
        tail is not run, so not counted; tasks.Task.tokens_run), `seconds` the step's wall time. `extra`: more
        numbers of the step, such as the preference metrics (reward_margin, reward_acc, chosen_logp,
        rejected_logp; see train/preference.py)."""
        if not self.enabled:
            return
        more = {k: round(v, 6) for k, v in (extra or {}).items() if k != "loss"}
        tokens_per_s = tokens / max(seconds, 1e-9)
        self._write({"step": step, "loss": round(loss, 6), **more, "lr": lr, "tokens": int(tokens),
                     "tokens_per_s": round(tokens_per_s, 1)})
        if self.bar is not None:
            acc = f" acc {more['reward_acc']:.2f}" if "reward_acc" in more else ""
            acc += f" reward {more['reward']:.3f}" if "reward" in more else ""  # grpo
            self.bar.set_postfix_str(f"loss {loss:.4f}{acc} lr {lr:.3g} {tokens_per_s:,.0f} tok/s", refresh=False)
            self.bar.update(1)

    def eval(self, step: int, result: dict) -> None:
        if not self.enabled:
            return
        self._write({"step": step, **{f"eval_{k}": v for k, v in result.items() if v is not None}})
        if "loss" not in result:  # grpo: rewards of the held-out prompts' completions
            passes = " ".join(f"{k} {v:.3f}" for k, v in result.items() if k.startswith("pass@"))
            msg = f"step {step}: eval reward {result['reward']:.4f} {passes} ({result['prompts']} prompts)"
            (self.bar.write if self.bar is not None else print)(msg)
            return
        msg = f"step {step}: eval loss {result['loss']:.4f}"
        if "ppl" in result:
            msg += f" ppl {result['ppl']:.2f}"
        if "reward_acc" in result:
            msg += (f" reward accuracy {result['reward_acc']:.3f} margin {result['reward_margin']:.4f} "
                    f"({result['pairs']} pairs)")
        (self.bar.write if self.bar is not None else print)(msg)

    def close(self, plot: bool = False) -> None:
        if not self.enabled or self.file is None:
            return
        if self.bar is not None:
            self.bar.close()
        self.file.close()
        self.file = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
        if plot:
            plot_losses(self.records, self.out_dir / PLOT_FILE)


def plot_losses(records: list[dict], path: Path) -> None:
    steps = [r for r in records if "loss" in r]
    if not steps:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], label="train loss")
    evals = [r for r in records if "eval_loss" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def _plain(recipe: Recipe) -> dict:
    import yaml

    return yaml.safe_load(dump_recipe(recipe))
