"""Every interface text of the web UI, one table per language. Recipe keys, file names and the CLI's messages
stay as the CLI writes them (they are what a user types and searches for); everything else is here.

A key missing from a language falls back to English, and tests/ui/test_texts.py checks that every key has
a Chinese text, so the fallback is never what a user sees.
"""

from __future__ import annotations

EN: dict[str, str] = {
    "title": "## rwkv-peft — fine-tune RWKV-7 from the browser",
    "lang": "Language / 语言",
    "tab.train": "Train", "tab.data": "Data", "tab.chat": "Chat", "tab.eval": "Evaluate", "tab.runs": "Runs",
    # train
    "train.recipe": "Recipe", "train.recipe_file": "Recipe file (YAML path; overrides the choice above)",
    "train.load": "Load recipe", "train.check": "Check", "train.command": "Command (the same run from a terminal)",
    "train.save_path": "Save as (YAML path)", "train.save": "Save as YAML", "train.start": "Start",
    "train.stop": "Stop",
    "train.resume": "Resume", "train.status": "Status", "train.plot": "Loss", "train.console": "Trainer output",
    "train.sec.model": "Model", "train.sec.method": "Method", "train.sec.data": "Data", "train.sec.train": "Training",
    "train.sec.log": "Logging", "train.sec.run": "Run directory",
    "train.ok": "recipe OK", "train.saved": "saved {path}", "train.started": "started: {command}",
    "train.stopping": "Stop sent to {run}: it saves its last step and exits",
    "train.no_run": "no run is training in {run}",
    "train.need_out_dir": "out_dir: give the run directory to stop (the Run directory section)",
    "train.progress": "{status}: step {step} of {total}{eta} — {tps} tokens/s — loss {loss}{eval}",
    "train.eta": ", {eta} left", "train.eval_loss": " — eval loss {loss}",
    "status.running": "running", "status.finished": "finished", "status.stopped": "stopped",
    "status.none": "not started",
    # data
    "data.path": "Data file (jsonl, json, parquet, or binidx prefix)", "data.kind": "Data kind",
    "data.tokenizer": "Tokenizer", "data.ctx_len": "Context length", "data.open": "Open",
    "data.summary": "Summary", "data.records": "First records",
    "data.masks": "Tokens that carry loss (what training learns)",
    "data.loss": "trained", "data.context": "context only", "data.out": "binidx output prefix",
    "data.build": "Build binidx", "data.built": "wrote {out}.bin/.idx: {docs} documents, {tokens} tokens",
    # chat
    "chat.model": "Model (.pth)", "chat.adapter": "Adapter or state (run directory or file)",
    "chat.compare": "A/B: also answer with the base model (same message, same seed)", "chat.system": "System prompt",
    "chat.max_tokens": "Max new tokens", "chat.temperature": "Temperature", "chat.top_p": "Top-p", "chat.seed": "Seed",
    "chat.message": "Message", "chat.send": "Send", "chat.clear": "Clear", "chat.load": "Load model",
    "chat.tuned": "Tuned (model + adapter)", "chat.base": "Base model", "chat.loaded": "loaded {what}",
    "chat.empty": "(no reply: the model ended its turn at once)",
    "chat.no_message": "message: type a message to send first",
    # evaluate
    "eval.model": "Model (.pth)", "eval.adapter": "Adapter or state (run directory or file)",
    "eval.data": "Data file", "eval.mode": "Evaluation",
    "eval.mode.loss": "Loss / perplexity", "eval.mode.ctx": "Loss by context length",
    "eval.mode.passkey": "Passkey retrieval", "eval.mode.niah": "Needle in a haystack",
    "eval.mode.pairs": "Preference pairs: reward accuracy",
    "eval.compare": "Compare: base model and the adapter", "eval.max_ctx": "Longest context (tokens)",
    "eval.run": "Evaluate", "eval.result": "Result", "eval.plot": "Plot",
    # runs
    "runs.table": "Runs", "runs.refresh": "Refresh", "runs.pick": "Run", "runs.inspect": "Inspect",
    "runs.curve": "Loss curve", "runs.format": "Write as", "runs.base": "Base model (.pth) for merge / export",
    "runs.out": "Output path", "runs.write": "Write", "runs.formats": "Which runtime loads what",
    "runs.delete": "Delete run", "runs.confirm": "Yes, delete this run directory and everything in it",
    "runs.deleted": "deleted {run}", "runs.need_confirm": "tick the box to confirm the deletion first",
    "runs.col.run": "run", "runs.col.method": "method", "runs.col.status": "status", "runs.col.steps": "steps",
    "runs.col.loss": "loss", "runs.col.eval": "eval loss",
    # common
    "error": "error", "working": "working…",
    # runs tab (helper)
    "runs.no_run": "pick a run first", "runs.need_base": "{command}: needs the base model (BASE) path",
    "runs.runtimes": (
        "| runtime | what it loads | write as |\n| --- | --- | --- |\n"
        "| `rwkv` pip package, ChatRWKV, RWKV-Runner (model) | official `.pth` | `merge` |\n"
        "| RWKV-Runner (state file) | `.pth` with one `blocks.N.att.time_state` per layer | "
        "`export --format runner-state` |\n"
        "| web-rwkv, Ai00 (model) | safetensors `.st`, fp16 | `export --base BASE --format st` |\n"
        "| web-rwkv, Ai00 (LoRA blended at load, state file) | `.st` LoRA / state | `export --format st` |\n"
        "| Hugging Face transformers + fla (`from_pretrained`) | fla-hub directory | "
        "`export --base BASE --format hf` |\n"
        "| RWKV-PEFT | adapter `.pth` | `export --format rwkv-peft` |\n"
        "| any of them (a model file) | `.pth`, `.st` or an HF directory | `convert` (BASE is its input; the "
        "format follows OUT's suffix: `.pth`, `.st`, else an HF directory) |\n\n"
        "Each runs the CLI (`rwkv-peft merge`, `export`, `convert`); an existing output is written over, as on "
        "the command line."),
}

ZH: dict[str, str] = {
    "title": "## rwkv-peft — 在浏览器中微调 RWKV-7",
    "lang": "Language / 语言",
    "tab.train": "训练", "tab.data": "数据", "tab.chat": "对话", "tab.eval": "评测", "tab.runs": "运行记录",
    "train.recipe": "配方", "train.recipe_file": "配方文件（YAML 路径；优先于上面的选择）",
    "train.load": "载入配方", "train.check": "检查", "train.command": "命令（在终端中运行同一任务）",
    "train.save_path": "另存为（YAML 路径）", "train.save": "保存为 YAML", "train.start": "开始", "train.stop": "停止",
    "train.resume": "继续", "train.status": "状态", "train.plot": "损失", "train.console": "训练输出",
    "train.sec.model": "模型", "train.sec.method": "方法", "train.sec.data": "数据", "train.sec.train": "训练参数",
    "train.sec.log": "日志", "train.sec.run": "运行目录",
    "train.ok": "配方无误", "train.saved": "已保存 {path}", "train.started": "已开始：{command}",
    "train.stopping": "已向 {run} 发送停止：保存最后一步后退出", "train.no_run": "{run} 中没有正在训练的任务",
    "train.need_out_dir": "out_dir：请填写要停止的运行目录（见“运行目录”一节）",
    "train.progress": "{status}：第 {step} / {total} 步{eta} — {tps} tokens/s — 损失 {loss}{eval}",
    "train.eta": "，剩余 {eta}", "train.eval_loss": " — 验证损失 {loss}",
    "status.running": "运行中", "status.finished": "已完成", "status.stopped": "已停止", "status.none": "未开始",
    "data.path": "数据文件（jsonl、json、parquet 或 binidx 前缀）", "data.kind": "数据类型",
    "data.tokenizer": "分词器", "data.ctx_len": "上下文长度", "data.open": "打开",
    "data.summary": "概要", "data.records": "前几条记录", "data.masks": "计入损失的 token（训练学习的内容）",
    "data.loss": "训练", "data.context": "仅作上下文", "data.out": "binidx 输出前缀",
    "data.build": "生成 binidx", "data.built": "已写入 {out}.bin/.idx：{docs} 篇文档，{tokens} 个 token",
    "chat.model": "模型（.pth）", "chat.adapter": "适配器或状态（运行目录或文件）",
    "chat.compare": "A/B：同时用基础模型回答（同一消息、同一随机种子）", "chat.system": "系统提示词",
    "chat.max_tokens": "最多生成 token 数", "chat.temperature": "温度", "chat.top_p": "Top-p", "chat.seed": "随机种子",
    "chat.message": "消息", "chat.send": "发送", "chat.clear": "清空", "chat.load": "载入模型",
    "chat.tuned": "微调后（模型 + 适配器）", "chat.base": "基础模型", "chat.loaded": "已载入 {what}",
    "chat.empty": "（无回复：模型立即结束了这一轮）",
    "chat.no_message": "消息：请先输入要发送的消息",
    "eval.model": "模型（.pth）", "eval.adapter": "适配器或状态（运行目录或文件）",
    "eval.data": "数据文件", "eval.mode": "评测项目",
    "eval.mode.loss": "损失 / 困惑度", "eval.mode.ctx": "按上下文长度的损失",
    "eval.mode.passkey": "密钥检索（passkey）", "eval.mode.niah": "大海捞针（NIAH）",
    "eval.mode.pairs": "偏好数据对：奖励准确率",
    "eval.compare": "对比：基础模型与适配器", "eval.max_ctx": "最长上下文（token）",
    "eval.run": "开始评测", "eval.result": "结果", "eval.plot": "图表",
    "runs.table": "运行记录", "runs.refresh": "刷新", "runs.pick": "运行", "runs.inspect": "查看",
    "runs.curve": "损失曲线", "runs.format": "导出格式", "runs.base": "基础模型（.pth），用于合并 / 导出",
    "runs.out": "输出路径", "runs.write": "写出", "runs.formats": "各推理框架可加载的格式",
    "runs.delete": "删除运行", "runs.confirm": "确认删除此运行目录及其中全部内容",
    "runs.deleted": "已删除 {run}", "runs.need_confirm": "请先勾选确认框再删除",
    "runs.col.run": "运行", "runs.col.method": "方法", "runs.col.status": "状态", "runs.col.steps": "步数",
    "runs.col.loss": "损失", "runs.col.eval": "验证损失",
    "error": "错误", "working": "处理中…",
    # runs tab (helper)
    "runs.no_run": "请先选择一个运行", "runs.need_base": "{command}：需要基础模型（BASE）路径",
    "runs.runtimes": (
        "| 推理框架 | 加载的格式 | 导出方式 |\n| --- | --- | --- |\n"
        "| `rwkv` pip 包、ChatRWKV、RWKV-Runner（模型） | 官方 `.pth` | `merge` |\n"
        "| RWKV-Runner（状态文件） | 每层一个 `blocks.N.att.time_state` 的 `.pth` | "
        "`export --format runner-state` |\n"
        "| web-rwkv、Ai00（模型） | safetensors `.st`，fp16 | `export --base BASE --format st` |\n"
        "| web-rwkv、Ai00（加载时混合的 LoRA、状态文件） | `.st` LoRA / 状态 | `export --format st` |\n"
        "| Hugging Face transformers + fla（`from_pretrained`） | fla-hub 目录 | `export --base BASE --format hf` |\n"
        "| RWKV-PEFT | 适配器 `.pth` | `export --format rwkv-peft` |\n"
        "| 以上任一（模型文件） | `.pth`、`.st` 或 HF 目录 | `convert`（BASE 为输入；格式由 OUT 的后缀决定："
        "`.pth`、`.st`，其他为 HF 目录） |\n\n"
        "均调用命令行（`rwkv-peft merge`、`export`、`convert`）；与命令行相同，已存在的输出会被覆盖。"),
}

TEXTS = {"en": EN, "zh": ZH}
LANGS = tuple(TEXTS)


def text(lang: str, key: str, **fmt: object) -> str:
    """The interface text `key` in `lang` (English where missing), with {placeholders} filled in."""
    s = TEXTS.get(lang, EN).get(key, EN.get(key, key))
    return s.format(**fmt) if fmt else s
