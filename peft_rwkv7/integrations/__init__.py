"""Bridges to other tools (lm-evaluation-harness). Nothing in the package imports these modules;
each needs its tool installed (`pip install 'rwkv-peft[lmeval]'`)."""
