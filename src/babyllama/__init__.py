"""babyllama: pretrain and fine-tune a small Chinese LLaMA-2 from scratch.

Run `babyllama --help` (or `python -m babyllama --help`) for the commands.
"""

__version__ = "0.1.0"
