"""`rwkv-peft ui`: the web UI (gradio), the top floor beside the CLI: it imports train/infer/adapters/data,
nothing imports it, and it calls the same functions the CLI calls."""
