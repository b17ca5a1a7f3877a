"""Local lm-eval tasks over a LAMBADA-style jsonl ({"text"} per line, the last word is the target):
`rwkv_lambada_acc` (lm-eval's lambada_openai over a local file) and `rwkv_lambada_ppl` (each document
scored with loglikelihood_rolling, perplexity per World token), as README.md shows them."""

from __future__ import annotations

import json
from pathlib import Path

LAMBADA_TASKS = {
    "rwkv_lambada_acc": """task: rwkv_lambada_acc
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
doc_to_target: "{{{{' '+text.split(' ')[-1]}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""",
    "rwkv_lambada_ppl": """task: rwkv_lambada_ppl
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
process_results: !function rwkv_tasks.token_perplexity
metric_list:
  - metric: token_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
""",
}
TASK_UTILS = '''from peft_rwkv7.data import load_tokenizer

_TOK = load_tokenizer("world")


def token_perplexity(doc, results):
    return {"token_perplexity": (results[0], len(_TOK.encode(doc["text"])))}
'''


def write_tasks(folder: Path, data: Path) -> Path:
    """Both task files (reading `data`) and their utils module in folder/tasks; returns that folder
    (lm-eval's --include_path / TaskManager(include_path=...))."""
    tasks = folder / "tasks"
    tasks.mkdir(parents=True)
    for name, text in LAMBADA_TASKS.items():
        (tasks / f"{name}.yaml").write_text(text.format(data=json.dumps(str(data))))
    (tasks / "rwkv_tasks.py").write_text(TASK_UTILS)
    return tasks
