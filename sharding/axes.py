"""Logical axis names: the vocabulary shared by model code and sharding rules.

Weights and activations are named apart (MaxText's lesson), so one rule table can
send a weight's `embed` and an activation's `batch` to the same mesh axis (FSDP).
Model code uses only these names; `sharding/rules.py` maps them to mesh axes.
"""

# Weights.
EMBED = "embed"
HEADS = "heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
MLP = "mlp"
VOCAB = "vocab"
EXPERTS = "experts"
LAYERS = "layers"

# Activations.
BATCH = "batch"
LENGTH = "length"
ACT_EMBED = "act_embed"
ACT_HEADS = "act_heads"
ACT_MLP = "act_mlp"
ACT_VOCAB = "act_vocab"

WEIGHT_AXES = (EMBED, HEADS, KV_HEADS, HEAD_DIM, MLP, VOCAB, EXPERTS, LAYERS)
ACTIVATION_AXES = (BATCH, LENGTH, ACT_EMBED, ACT_HEADS, ACT_MLP, ACT_VOCAB)
LOGICAL_AXES = WEIGHT_AXES + ACTIVATION_AXES

# Mesh axes, always in this order (size 1 where unused).
MESH_AXES = ("data", "fsdp", "pipeline", "expert", "sequence", "tensor")
