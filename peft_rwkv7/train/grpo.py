"""GRPO inside the training loop (train.objective: grpo): rollouts, rewards, advantages, the step's backward,
held-out reward evaluation. The loss formulas are train/grpo_loss.py, the rewards train/rewards.py, the batched
sampler infer/sampler.py.

One generation batch = the step's prompts (micro_bsz x grad_accum per process), G completions each, sampled
with the method on (eval mode), each prompt's from a generator seeded by (train.seed, generation index, its global
sample number): a prompt's random numbers are the same however the step is split into micro-batches and processes,
and nothing random needs saving for an exact resume. The rollouts are the same wherever the sampler's batches hold the
same prompts (each rank's micro-batches as one process's): the logits of a batched step round differently with its
number of rows (CPU GEMM), which now and then turns a draw on a CDF boundary into the neighbouring token. The
log-probs in the ratio are recomputed by the training forward over prompt + completion; the sampler's own
(plain softmax) log-probs are only compared with them (`logp_gap`). With num_iterations mu > 1 the rollouts
of generation g = step // mu serve mu optimizer steps; they are kept (and checkpointed) with the policy's
log-probs at sampling time, the `old` policy of the ratio. The KL reference (beta > 0) is the method switched
off (adapters.disable_adapter), or a frozen copy for full / train_parts as DPO's.
"""

from __future__ import annotations

import contextlib
import json
import math
import time

import torch

from ..adapters import disable_adapter
from ..errors import UserError
from ..infer.sampler import sample_groups
from .distributed import micro_backward
from .grpo_loss import advantages, check_group_size, grpo_loss, zero_spread_share
from .memory import available_memory, is_out_of_memory
from .rewards import RewardSet
from .rewards_builtin import COMPLETION_IDS
from .tasks import Task, sum_over_ranks

SEED_STREAM = 0x6790  # generator seed = (train.seed, this, generation index, rank)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of n samples of which c pass (Chen et al. 2021, arXiv:2107.03374): 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def _generator(seed: int, gen: int, sample: int, device: torch.device) -> torch.Generator:
    """The generator of one prompt's completions: seeded by (train.seed, generation index, the prompt's global
    sample number), so its draws are the same however a step's prompts are split into micro-batches and
    processes (integers only: Python's hash of a tuple of ints is the same in every process)."""
    g = torch.Generator(device=device)
    g.manual_seed(hash((seed, SEED_STREAM, gen, sample)) & (2**63 - 1))
    return g


def _rows(prompts: list[list[int]], ro, G: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs [R, T], labels [R, T]) of prompt + completion per row: labels are the completion tokens at the
    positions that predict them, -100 elsewhere (the prompt, padding)."""
    R = len(prompts) * G
    seqs = [prompts[r // G] + ro.completion_ids[r, : int(ro.lengths[r])].tolist() for r in range(R)]
    T = max(len(s) for s in seqs) - 1
    x = torch.zeros(R, T, dtype=torch.long)
    y = torch.full((R, T), -100, dtype=torch.long)
    for r, s in enumerate(seqs):
        n_prompt = len(prompts[r // G])
        x[r, : len(s) - 1] = torch.tensor(s[:-1])
        y[r, n_prompt - 1 : len(s) - 1] = torch.tensor(s[n_prompt:])
    return x, y


def token_logps(model, x: torch.Tensor, y: torch.Tensor, precision) -> torch.Tensor:
    """log pi(y_t | x_<=t) [R, T] (0 where y is -100), through the model's fused head."""
    with precision():
        nll, _ = model.token_nll(x, y)
    return -nll.float()


class _Buffer:
    """The rollouts of the current generation batch, as a checkpoint entry (state_dict / load_state_dict)."""

    def __init__(self):
        self.gen: int | None = None
        self.micro: list[dict] = []

    def state_dict(self) -> dict:
        return {"gen": self.gen, "micro": self.micro}

    def load_state_dict(self, sd: dict) -> None:
        self.gen, self.micro = sd["gen"], sd["micro"]


def rollout_bytes(config, rows: int) -> int:
    """Less than `rows` rollout rows hold at once: each row's recurrent state (WKV and two token shifts a layer)
    and its logits, in fp32."""
    return rows * 4 * (config.n_layer * (config.n_head * config.head_size**2 + 2 * config.n_embd) + config.vocab_size)


class Scorer:
    """Samples completions of prompts (data/prompts.PromptData) and scores them with the recipe's rewards: the
    one path of training rollouts, the loop's held-out evaluation and `rwkv-peft eval --rewards`. `eval_rows_from`:
    the key or flag that sets how many completions of each prompt an evaluation samples, named (as training's keys
    are) when a rollout's rows do not fit in memory."""

    def __init__(self, cfg, tokenizer, columns: list[str], source: str | None = None,
                 eval_rows_from: str = "train.grpo.eval_samples"):
        self.cfg, self.tokenizer, self.eval_rows_from = cfg, tokenizer, eval_rows_from
        self.rewards = RewardSet(cfg.rewards)
        self.rewards.check_columns(columns, source)  # completion_ids, which _sample adds, counts as present

    def _sample(self, model, data, idxs: list[int], G: int, temperature: float, generator, precision,
                rows_from: str = "train.grpo.num_generations or train.micro_bsz"):
        g = self.cfg
        prompts = [data.ids[i] for i in idxs]
        rows = f"{len(prompts)} prompts x {G} completions = {len(prompts) * G} rows sampled at once"
        need = rollout_bytes(model.config, len(prompts) * G)
        free = available_memory(next(model.parameters()).device)
        if free is not None and need > free:
            raise UserError(f"{rows} need over {need / 2**30:.1f} GiB for their states and logits, "
                            f"{free / 2**30:.1f} GiB is free; lower {rows_from}")
        try:
            with precision():
                ro = sample_groups(model, prompts, G, g.max_new_tokens, temperature, g.top_p, generator,
                                   stop_strings=g.stop, decode=self.tokenizer.decode,
                                   vocab_size=getattr(self.tokenizer, "vocab_size", None))
        except (MemoryError, RuntimeError) as e:
            if not is_out_of_memory(e):
                raise
            raise UserError(f"{rows} ran out of memory; lower {rows_from}") from e
        texts = [data.texts[i] for i in idxs for _ in range(G)]
        columns = {k: [data.columns[i][k] for i in idxs for _ in range(G)] for k in data.columns[idxs[0]]}
        columns[COMPLETION_IDS] = [ro.completion_ids[r, : int(ro.lengths[r])].tolist() for r in range(len(texts))]
        total, per_fn = self.rewards(texts, ro.texts, columns)
        return prompts, ro, texts, total, per_fn


class GrpoTask(Task):
    def __init__(self, recipe, tokenizer, data, dist):
        self.cfg = g = recipe.train.grpo
        check_group_size(g.num_generations, g.scale_rewards, g.loss_type)
        if g.temperature == 0:
            raise UserError(f"train.grpo.temperature: 0 samples one greedy completion {g.num_generations} times per "
                            "prompt: every group scores alike and GRPO learns nothing; use > 0 (1.0 is usual)")
        self.scorer = Scorer(g, tokenizer, list(data.columns[0]), data.source)
        files = {d.source: d for d in (data, data.held_out) if d is not None}  # eval_split: one file, checked once
        for source, part in files.items():
            self.scorer.rewards.check_records(part.file_records(), source)
        self.rewards = self.scorer.rewards
        self.buffer = _Buffer()
        self.eval_data = data.held_out

    def batches(self, run, step: int) -> list:
        tc, dist = run.recipe.train, run.dist
        gen = step // self.cfg.num_iterations
        return [run.data.batch(gen, micro, tc.micro_bsz, tc.grad_accum, dist.rank, dist.world_size)
                for micro in range(tc.grad_accum)]

    def tokens_run(self, run, batches) -> int:
        """The completions' token slots this rank generates and trains on (a step is mostly its rollouts)."""
        return sum(len(b) for b in batches) * self.cfg.num_generations * self.cfg.max_new_tokens

    def checkpoint_state(self) -> dict:
        return {"grpo_rollouts": self.buffer} if self.cfg.num_iterations > 1 else {}

    def _rollout(self, run, gen: int, batches) -> None:
        """Sample, score and lay out the rows of every micro-batch of generation `gen` (no gradients)."""
        g, tc, dist, device = self.cfg, run.recipe.train, run.dist, run.device
        t0 = time.perf_counter()
        micro = []
        for m, idxs in enumerate(batches):
            first = ((gen * tc.grad_accum + m) * dist.world_size + dist.rank) * tc.micro_bsz  # as data.batch numbers
            generators = [_generator(tc.seed, gen, first + j, torch.device("cpu")) for j in range(len(idxs))]
            prompts, ro, texts, total, per_fn = self.scorer._sample(run.model, run.data, idxs, g.num_generations,
                                                                    g.temperature, generators, run.precision)
            x, y = _rows(prompts, ro, g.num_generations)
            mask = y != -100
            if g.mask_truncated:
                mask &= ~ro.truncated[:, None]
            micro.append({"x": x, "y": y, "mask": mask, "rewards": total, "per_fn": per_fn,
                          "sampler_logp": ro.logp_plain, "lengths": ro.lengths, "truncated": ro.truncated,
                          "entropy": ro.entropy,
                          "prompts": texts, "completions": ro.texts})
        rewards = torch.stack([m["rewards"] for m in micro]).view(-1, g.num_generations)
        if g.scale_rewards == "batch" and dist.world_size > 1:  # the std of every rank's rewards
            centered = rewards - rewards.mean(1, keepdim=True)
            s = torch.tensor([rewards.sum(), (rewards ** 2).sum(), rewards.numel()], dtype=torch.float64, device=device)
            torch.distributed.all_reduce(s)
            std = ((s[1] - s[0] ** 2 / s[2]) / (s[2] - 1)).clamp_min(0).sqrt().float().cpu()
            adv = centered / (std + 1e-4)
        else:
            adv = advantages(rewards, g.scale_rewards)
        for m, a in zip(micro, adv.view(len(micro), -1), strict=True):
            m["adv"] = a
        with torch.no_grad():
            for m in micro:
                x, y = m["x"].to(device), m["y"].to(device)
                m["old_logp"] = token_logps(run.model, x, y, run.precision).cpu() if g.num_iterations > 1 else None
                m["ref_logp"] = self._reference(run, x, y) if g.beta > 0 else None
        self.buffer.gen, self.buffer.micro = gen, micro
        self.rollout_s = time.perf_counter() - t0

    def _reference(self, run, x, y) -> torch.Tensor:
        if run.reference is not None:
            return token_logps(run.reference, x, y, run.precision).cpu()
        with disable_adapter(run.model):
            return token_logps(run.model, x, y, run.precision).cpu()

    def backward(self, run, step: int, batches) -> dict:
        g, dist, device = self.cfg, run.dist, run.device
        gen = step // g.num_iterations
        self.rollout_s = 0.0
        if self.buffer.gen != gen:
            self._rollout(run, gen, batches)
        t0 = time.perf_counter()
        micro = self.buffer.micro
        n_tokens = sum_over_ranks(float(sum(int(m["mask"].sum()) for m in micro)), dist, device)
        n_rows = sum_over_ranks(float(sum(m["x"].shape[0] for m in micro)), dist, device)
        sums: dict[str, float] = {}
        for m in micro:
            x, y, mask = m["x"].to(device), m["y"].to(device), m["mask"].to(device)
            logp = token_logps(run.model, x, y, run.precision)
            old = m["old_logp"].to(device) if m["old_logp"] is not None else logp.detach()
            ref = m["ref_logp"].to(device) if m["ref_logp"] is not None else None
            loss, metrics = grpo_loss(logp, old, ref, m["adv"].to(device), mask, loss_type=g.loss_type,
                                      importance=g.importance, epsilon=g.epsilon, epsilon_high=g.epsilon_high,
                                      beta=g.beta, max_completion_length=g.max_new_tokens,
                                      num_items_in_batch=max(n_tokens, 1.0))
            # dapo sums to the step's loss over micro-batches and ranks; the others are micro-batch means,
            # weighted by the micro-batch's share of the step's completions
            weight = 1.0 if g.loss_type == "dapo" else x.shape[0] / n_rows
            micro_backward(run.engine, loss, weight * dist.world_size, step)
            tokens = float(mask.sum())
            gap = (m["sampler_logp"].to(device) - _completion_aligned(logp, m)).abs()
            for key, value in (("loss", weight * loss.item()), ("kl", tokens * metrics.get("kl", 0.0)),
                               ("clip", tokens * float(metrics["clip"])), ("logp_gap", float(gap.sum()))):
                sums[key] = sums.get(key, 0.0) + float(value)
            del logp, old, loss, metrics, gap  # this micro-batch's graph, before the next one's forward (tasks.py)
        out = {k: sum_over_ranks(v, dist, device) for k, v in sums.items()}
        result = {"loss": out["loss"]}
        result.update(self._reward_metrics(run, micro))
        for key in ("kl", "clip", "logp_gap"):
            result[key] = out[key] / max(n_tokens, 1.0)
        if g.beta == 0:
            result.pop("kl")
        result["rollout_s"], result["update_s"] = self.rollout_s, time.perf_counter() - t0
        if dist.world_size == 1 or dist.is_main:
            self._log_rollouts(run, step, micro)
        return result

    def _reward_metrics(self, run, micro) -> dict:
        """Means over every completion of the step, every rank's (sums all-reduced in float64)."""
        g = self.cfg
        rewards = torch.cat([m["rewards"] for m in micro]).double()
        groups = rewards.numel() // g.num_generations
        sums = [rewards.sum(), (rewards ** 2).sum(), torch.tensor(float(rewards.numel())),
                zero_spread_share(rewards, g.num_generations) * groups, torch.tensor(float(groups)),
                torch.cat([m["lengths"] for m in micro]).double().sum(),
                sum(m["entropy"].double().sum() for m in micro)]
        for name in self.rewards.names:
            v = torch.cat([m["per_fn"][name] for m in micro]).double()
            sums += [v.nansum(), (~v.isnan()).sum().double()]
        t = torch.stack([x.double() for x in sums])
        if run.dist.world_size > 1:
            t = t.to(run.device)
            torch.distributed.all_reduce(t)
        t = t.cpu().tolist()
        n = t[2]
        var = (t[1] - t[0] ** 2 / n) / (n - 1) if n > 1 else 0.0
        out = {"reward": t[0] / n, "reward_std": max(var, 0.0) ** 0.5, "zero_spread": t[3] / t[4],
               "completion_len": t[5] / n, "entropy": t[6] / max(t[5], 1.0)}
        for j, name in enumerate(self.rewards.names):
            total, count = t[7 + 2 * j], t[8 + 2 * j]
            out[f"reward/{name}"] = total / count if count else float("nan")
        return out

    def _log_rollouts(self, run, step: int, micro) -> None:
        every = run.recipe.log.rollouts_every
        if not every or (step + 1) % every or self.buffer.gen * self.cfg.num_iterations != step:
            return
        with open(run.out_dir / "rollouts.jsonl", "a", encoding="utf-8") as f:
            for m in micro:
                for r, (p, c) in enumerate(zip(m["prompts"], m["completions"], strict=True)):
                    rec = {"step": step + 1, "prompt": p, "completion": c, "reward": m["rewards"][r].item(),
                           **{k: (None if math.isnan(v[r].item()) else v[r].item()) for k, v in m["per_fn"].items()}}
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")

    def evaluate(self, run) -> dict | None:
        if self.eval_data is None or self.eval_data.num_docs == 0:
            return None
        return evaluate_rewards(self.scorer, run.model, self.eval_data, run.recipe.train.seed, run.device,
                                run.precision, run.recipe.train.micro_bsz)


def evaluate_rewards(scorer: Scorer, model, data, seed: int, device, precision=contextlib.nullcontext,
                     batch: int = 8, samples: int | None = None) -> dict:
    """Mean reward, pass@1 and pass@k (k = samples, default eval_samples; unbiased estimator) over every prompt of
    `data`: greedy for one sample, else k sampled at the rollout temperature from a fixed seed."""
    g = scorer.cfg
    k = samples or g.eval_samples
    rewards, p1, pk = [], [], []
    for start in range(0, data.num_docs, batch):
        idxs = list(range(start, min(start + batch, data.num_docs)))
        generators = [_generator(seed, -1, i, torch.device("cpu")) for i in idxs]  # per prompt: batch-independent
        _, _, _, total, _ = scorer._sample(model, data, idxs, k, 0.0 if k == 1 else g.temperature, generators,
                                           precision, scorer.eval_rows_from)
        total = total.view(len(idxs), k)
        rewards.append(total.flatten())
        for row in total:
            c = int((row >= g.pass_threshold).sum())
            p1.append(pass_at_k(k, c, 1))
            pk.append(pass_at_k(k, c, k))
    out = {"reward": torch.cat(rewards).mean().item(), "pass@1": sum(p1) / len(p1), "prompts": data.num_docs}
    if k > 1:
        out[f"pass@{k}"] = sum(pk) / len(pk)
    return out


def _completion_aligned(logp: torch.Tensor, m: dict) -> torch.Tensor:
    """The trainer's log-probs of each row's completion tokens, left-aligned like the sampler's [R, L]."""
    out = torch.zeros_like(m["sampler_logp"], device=logp.device)
    for r in range(logp.shape[0]):
        pos = (m["y"][r] != -100).nonzero().flatten()
        n = int(m["lengths"][r])
        out[r, :n] = logp[r, pos[:n]].detach()
    return out


__all__ = ["GrpoTask", "Scorer", "evaluate_rewards", "pass_at_k", "token_logps"]
