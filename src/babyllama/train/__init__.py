"""Training: one loop (trainer.py) for pretraining and SFT, their data, and torchrun setup."""
