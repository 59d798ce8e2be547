"""Training: the loop every recipe shares, losses, DP-SGD, and the pretrain, finetune and federated recipes."""
