"""Split learning building blocks: cut one resident peft model at block k (``cut``), move
activations and gradients as real bytes (``wire``), and run split steps for the split algorithms
(``trainer``, built by the engine; algorithms see only the protocol in ``types``)."""
