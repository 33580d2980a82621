"""The walkthrough's fixed numbers: network sizes, the two tasks, training defaults.

Each non-obvious choice carries a ``NOTE:`` with the measurement behind it.
"""

from __future__ import annotations

IN_FEATURES, HIDDEN, OUT_FEATURES = 128, 256, 10
LAYERS = ("fc1", "fc2", "fc3")
RANKS = (1, 4, 8, 16, 32, 64)  # section 9's rank comparison

LORA_RANK, VERA_RANK = 8, 256
LORA_LR, VERA_LR = 1e-3, 1e-2
# NOTE: VeRA's rank is PEFT's default, 256: it is not bounded by the layer sizes
# (the shared projections are random), and each rank costs one trainable number
# per layer. VeRA trains only a few hundred scaling numbers: at LoRA's 1e-3 it
# barely moves in 100 epochs here (task B 71 % vs 76 % at 1e-2), as the
# VeRA paper's larger learning rates suggest. Measured with seed 0 at lr 1e-2:
# r=64 76 %, r=256 86 % on task B.
LORAPLUS_RATIO = 16.0  # LoRA+: lora_B's learning rate over lora_A's
# AdaLoRA: every layer starts with ADALORA_INIT_FACTOR x --rank triplets (12 for the
# default 8, PEFT's example's init_r=12 / target_r=8) and the allocator prunes them
# to --rank per layer on average, so it ends at LoRA r=8's budget of 24 triplets.
# The budget stays at the start for the first ADALORA_TINIT of the steps, shrinks
# on PEFT's cubic schedule, and is fixed for the last ADALORA_TFINAL of the steps.
ADALORA_INIT_FACTOR = 1.5
ADALORA_TINIT, ADALORA_TFINAL = 0.1, 0.2
# The 4-bit format of --variant qlora / qdora (bitsandbytes' QLoRA defaults).
NF4 = {"quant_type": "nf4", "blocksize": 64, "double_quant": True}

# Task A: labels from a random teacher 128 -> TEACHER_HIDDEN -> 10.
TEACHER_HIDDEN = 32
PRETRAIN_SAMPLES, PRETRAIN_TEST_SAMPLES = 16_000, 2_000
PRETRAIN_BATCH, PRETRAIN_LR = 128, 2e-3
# Task B: the pretrained network plus a rank-DELTA_RANK change of each weight
# matrix, of Frobenius norm DELTA_SCALE * ||W||.
DELTA_RANK, DELTA_SCALE = 2, 3.0
TRAIN_SAMPLES, VAL_SAMPLES = 1_000, 200
# NOTE: inputs are drawn from N(0, I) and only the KEEP_FRACTION with the
# largest teacher margin (top-1 minus top-2 logit) are kept. Without this many
# labels sit on a decision boundary and are coin flips that no student can
# learn from 1,000 samples; with it the task measures adaptation, not noise.
KEEP_FRACTION = 0.25
BATCH_SIZE = 50

# Seeds derived from --seed: data and pretraining use seed and seed + 1, the
# adapters' initialisation seed + 3 and every fine-tuning run's shuffling seed + 4,
# so that LoRA, full fine-tuning and each rank see the same batches.
PRETRAIN_SEED_OFFSET, ADAPTER_SEED_OFFSET, FINETUNE_SEED_OFFSET = 1, 3, 4

# --variant multi: MULTI_TASKS tasks (each drawn as task B), one adapter each, trained
# together in mixed batches; MULTI_EPOCHS by default (the runs train MULTI_TASKS adapters
# twice, together and one after the other).
MULTI_TASKS, MULTI_EPOCHS = 3, 10
