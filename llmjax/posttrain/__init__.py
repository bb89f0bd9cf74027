"""Post-training on a small model, each stage a plain loss plus one shared jitted step:

- `sft`: chat-template examples (`chat`), loss on response tokens only, packing with
  segment ids and per-example positions (`packing`, the model's attention mask);
- `dpo`: DPO against reference log-probs computed once;
- `reward` + `grpo` (driven by `rlhf`): a Bradley-Terry reward model, then GRPO with
  rollouts from `llmjax.decode.generate`, a KL penalty, rollout vs train time per iteration;
- `qlora`: the frozen base in NF4, adapters trained on top (`qlora=true lora.rank=8` in any
  stage's config).

Entry points: `python -m experiments.sft|dpo|rlhf --config experiments/configs/<stage>.yaml`.
Data are generated offline from the bundled plays (`chat.instruction_examples`,
`chat.preference_pairs`).
"""
