"""Post-training: SFT, DPO, reward model + GRPO (RLHF), QLoRA. See each module's docstring."""
