"""colora: collaborative LoRA fine-tuning (central, federated, heterogeneous-rank, split, decentralized)."""

import logging

# bitsandbytes (the optional `quant` extra, imported by peft when present) logs at import that an
# optional CPU kernel package is missing; it falls back to its own kernels, so this is noise that
# would break the one-line error contract on stderr.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

__version__ = "0.1.0"
