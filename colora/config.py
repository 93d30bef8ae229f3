"""Typed, validated experiment configuration.

The YAML file is parsed at the edge into pydantic models with ``extra="forbid"``, so an unknown
key, a wrong type or an impossible value stops the run before any work is done, with a one-line
message naming the dotted key and the offending value (see CONTRACT.md).
"""

from __future__ import annotations

import copy
import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator


class ColoraError(Exception):
    """A user-facing error: bad config, bad input, or a run that cannot go on.

    The CLI prints ``colora: error: <message>`` (one line, no traceback) and exits with code 2.
    """


class ConfigError(ColoraError):
    """The configuration names an unknown key or holds a wrong or impossible value."""


class NonFiniteError(ColoraError):
    """Training produced NaN or inf; ``setting`` is the config key most likely at fault."""

    def __init__(self, message: str, setting: str):
        super().__init__(message)
        self.setting = setting


# An error line quotes at most this much of any value it names: a value can be huge (a YAML alias
# bomb expands 300 bytes into millions of characters) or be a line of a file that is not ours to print.
QUOTE_CHARS = 80
# A YAML document may expand (through aliases) to at most this many values: far above any real
# config, far below what makes validation or an error message hang.
MAX_YAML_VALUES = 100_000


def quote(value: Any, limit: int = QUOTE_CHARS) -> str:
    """``repr(value)``, cut to ``limit`` characters (with ``...``) so an error stays one short line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_text_file(path: str | Path, what: str) -> str:
    """The text of ``path`` as UTF-8 (a leading BOM dropped), or a :class:`ConfigError` naming the
    file and what is wrong (missing, unreadable, not UTF-8); never the file's content."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} '{path}' does not exist" if not path.exists() else f"{what} '{path}' is not a file")
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} '{path}' is not UTF-8 text (invalid byte at offset {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"{what} '{path}' cannot be read ({exc.strerror})") from None


def parse_yaml(text: str, what: str) -> Any:
    """YAML text parsed safely; a syntax error or a document that expands (through aliases) to
    more than MAX_YAML_VALUES values is a one-line :class:`ConfigError` naming ``what``."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or exc.__class__.__name__
        raise ConfigError(f"{what} is not valid YAML: {problem}{where}") from None
    except RecursionError:
        raise ConfigError(f"{what} is not valid YAML: nested too deeply") from None
    stack, seen = [data], 0
    while stack:  # count values as validation would see them, aliases expanded, stopping early
        node = stack.pop()
        seen += 1
        if seen > MAX_YAML_VALUES:
            raise ConfigError(f"{what} expands to more than {MAX_YAML_VALUES} values (YAML aliases?); a config is far smaller")
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return data


def read_yaml(path: str | Path, what: str) -> Any:
    """A YAML file read as UTF-8 and parsed safely (see :func:`parse_yaml`)."""
    return parse_yaml(read_text_file(path, what), f"{what} '{path}'")


@dataclass(frozen=True)
class Registered:
    """A config value that must name an entry of a registry (``module:attribute``, a mapping keyed by
    name). Names are registered once, where the entries are implemented; the registry is imported
    only when a config is validated, so this module stays free of torch."""

    where: str

    def names(self) -> list[str]:
        module, attribute = self.where.split(":")
        return list(getattr(importlib.import_module(module), attribute))

    def __call__(self, value: str) -> str:
        names = self.names()
        if value not in names:
            raise ValueError(f"not a registered name (registered: {', '.join(names)})")
        return value


def registered(where: str) -> Any:
    """The type of a string field validated against the registry ``where`` (see :class:`Registered`)."""
    check = Registered(where)
    return Annotated[str, check, AfterValidator(check)]


AlgorithmName = registered("colora.algorithms:ALGORITHMS")
AggregatorName = registered("colora.aggregation:RULES")


class _Strict(BaseModel):
    # allow_inf_nan=False: inf and NaN are refused for every float key at load (a NaN lr would only
    # surface as a NaN model rounds later). Attribute docstrings are the keys' descriptions in
    # docs/config.md (generated from these classes by ``python -m colora.configdoc``).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False, use_attribute_docstrings=True)


class LoraConfig(_Strict):
    """The LoRA adapter (peft) attached to the frozen base: ΔW = (alpha / r) · B · A per target module."""

    r: int = Field(8, gt=0)
    """LoRA rank: A is r x d_in, B is d_out x r. Every client's rank unless ``federation.ranks`` or
    ``federation.rank_rule`` says otherwise; at most min(d_in, d_out) of every target module."""
    alpha: float = Field(16.0, gt=0)
    """Scale numerator: peft applies the update as (alpha / r) · B · A."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout probability on the LoRA input path (peft's ``lora_dropout``); seeded per client and step."""
    target_modules: list[str] | None = None
    """Names of the linear modules that get LoRA; null = the model family's default (BERT: query, value;
    GPT-2: c_attn; LLaMA: q_proj, v_proj)."""
    modules_to_save: list[str] = []
    """Modules trained in full beside the LoRA factors and the task head, and shared like them (peft's
    ``modules_to_save``; the task head is always trained). ``[pooler]`` trains a BERT-family encoder's
    pooler, which all-MiniLM-L6-v2 (``minilm-l6``) ships untrained (random weights, zero bias: it was
    trained with mean pooling) and which otherwise stays frozen between the [CLS] state and the head;
    the GLUE examples for STS-B and CoLA set it. A LoRA target inside such a module trains in full instead
    (peft injects no LoRA there). Costs the module's full size on the wire each way
    (MiniLM's pooler: 147,840 floats, 2x the q/v r=8 adapter) and 16 bytes a parameter of training memory."""


class ModelConfig(_Strict):
    """The frozen base model and the LoRA adapter trained on it."""

    name: str = "minilm-l6"
    """A Hugging Face hub id, a local model folder, or an alias: ``minilm-l6`` (pretrained
    all-MiniLM-L6-v2 encoder), ``tiny-bert``, ``tiny-gpt2``, ``tiny-llama`` (tiny random models for tests)."""
    task: Literal["seq-cls", "causal-lm"] = "seq-cls"
    """``seq-cls``: sequence classification (or regression) with a trained head; ``causal-lm``:
    next-token language modelling (e.g. E2E data-to-text). Must match the data set's kind."""
    lora: LoraConfig = LoraConfig()
    """The LoRA adapter."""
    quantize: Literal["none", "int8", "4bit"] = "none"
    """Frozen base weights quantized at load (QLoRA-style, bitsandbytes, the ``quant`` extra): ``none``
    keeps fp32; ``int8``; ``4bit`` is NF4. Saves base-weight memory, not time (on CPU a step is ~5% slower);
    LoRA weights stay fp32. ``federation.aggregator: stack`` refuses it."""
    dropout: float | None = Field(None, ge=0.0, lt=1.0)
    """The base model's own dropout (hidden states, attention, classifier) during training; ``null``
    keeps the model's (0.1 for BERT-family models). Split learning's two parties each draw their own
    dropout noise, so with dropout on a one-client split run is ``central`` in distribution, not step
    for step; with 0 it is exactly."""


class DataConfig(_Strict):
    """The task's data: which data set, where it lives, and how it is tokenized."""

    name: str = "synthetic"
    """The data set: ``glue/<task>`` (cola, sst2, mrpc, stsb, qqp, rte, qnli, mnli), ``e2e`` (causal LM),
    ``jsonl`` or ``csv`` (your files, columns below), or ``synthetic`` (a built-in 4-class task, no files)."""
    path: str | None = None
    """Local data folder: GLUE TSVs (``train.tsv``, ``dev.tsv``), E2E ``meaning||text`` files, or
    ``train`` and ``dev`` (or ``test``) ``.jsonl``/``.csv`` files; null = the hub (glue, e2e).
    Required for jsonl and csv. Made absolute at load and pinned by content hash for ``--resume``."""
    max_length: int = Field(128, gt=0)
    """Tokens per example; longer examples are truncated. Must fit the model's position embeddings;
    also the sequence length of the memory estimate."""
    text_column: str = "text"
    """jsonl/csv: the column holding the text (causal-lm: the prompt, or the whole text)."""
    text_pair_column: str | None = None
    """jsonl/csv: an optional second-sentence column (causal-lm: the target text); null = single texts."""
    label_column: str = "label"
    """jsonl/csv, seq-cls: the label column (integer class ids, strings as classes, or real numbers:
    more than 20 distinct values make a regression task)."""
    synthetic_train: int = Field(2000, gt=0)
    """``synthetic``: number of training examples (generated from ``seed``)."""
    synthetic_eval: int = Field(500, gt=0)
    """``synthetic``: number of evaluation examples."""
    max_train: int | None = Field(None, gt=0)
    """Keep only the first N training examples, before partitioning; null = all."""
    max_eval: int | None = Field(None, gt=0)
    """Evaluate on the first N evaluation examples only; null = all."""


class ByzantineConfig(_Strict):
    """Attacking clients (fedavg, declora), chosen per seed and listed in partition.json."""

    fraction: float = Field(0.0, ge=0.0, lt=1.0)
    """Share of clients that attack: round(fraction x clients.num) of them, drawn from the run's seed."""
    attack: Literal["sign_flip", "gaussian", "scaled", "label_flip"] = "sign_flip"
    """``sign_flip``: send sent - flip_scale x (trained - sent); ``gaussian``: send sent + N(0, noise_std^2) per
    entry; ``scaled``: send sent + scale x (trained - sent); ``label_flip``: train on flipped labels (class c -> C-1-c)."""
    scale: float = Field(10.0, gt=0)
    """``scaled``: the factor an attacker multiplies its update by."""
    flip_scale: float = Field(1.0, gt=0)
    """``sign_flip``: how far the update is sent reversed. 1 reverses it, which at a fraction f of a round's
    clients only shrinks the mean update to (1 - 2f) of the honest one; (1 - f) / f cancels it in
    expectation (4 at f = 0.2), larger values turn it around."""
    noise_std: float = Field(1.0, gt=0)
    """``gaussian``: the standard deviation of the noise an attacker sends as its update."""


class ClientsConfig(_Strict):
    """The simulated data owners and how the training set is split among them."""

    num: int = Field(10, gt=0)
    """Number of clients (data owners); the training set is partitioned among them."""
    per_round: int = Field(10, gt=0)
    """Clients sampled each round, seeded (fedavg, sl, splitlora); at most ``clients.num``.
    ``declora`` trains every client every round; ``central`` has no clients."""
    partition: Literal["iid", "dirichlet", "shards", "label_skew"] = "iid"
    """``iid``: shuffled, equal-size blocks; ``dirichlet``: label skew, per-class Dirichlet(``clients.alpha``)
    shares; ``shards``: ``clients.shards_per_client`` label-sorted shards each; ``label_skew``: the class
    proportions given in ``clients.proportions``."""
    alpha: float = Field(0.5, gt=0)
    """Dirichlet concentration for ``partition: dirichlet``; smaller is more skewed."""
    shards_per_client: int = Field(2, gt=0)
    """Label-sorted shards per client for ``partition: shards``."""
    byzantine: ByzantineConfig = ByzantineConfig()
    """Attacking clients (colora.attacks); none by default."""
    proportions: list[list[float]] | None = None
    """``partition: label_skew``: one row of class proportions per client, each row >= 0 and summing to 1,
    one entry per class, e.g. Dec-LoRA's [[0.15, 0.85], [0.85, 0.15], [0.5, 0.5]]."""


class TrainConfig(_Strict):
    """Local training: the optimizer steps every client (or the central run) takes."""

    local_steps: int = Field(10, gt=0)
    """Optimizer steps per client per round (``central``: steps per round on the pooled data)."""
    batch_size: int = Field(16, gt=0)
    """Training examples per optimizer step."""
    eval_batch_size: int = Field(64, gt=0)
    """Examples per evaluation batch (speed and memory only; the metrics do not change)."""
    lr: float = Field(5.0e-4, gt=0)
    """Learning rate of the local optimizer (the peak, after warm-up)."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Learning rate over rounds after warm-up: ``constant``; ``linear`` decay towards 0; ``cosine``
    half-cosine decay towards 0. The same per round in every paradigm."""
    warmup_rounds: int = Field(0, ge=0)
    """Rounds of linear warm-up from lr / warmup_rounds to lr; 0 = none."""
    optimizer: Literal["adamw", "sgd"] = "adamw"
    """Local optimizer: ``adamw`` or plain ``sgd`` (no momentum)."""
    client_optimizer: Literal["reset", "keep"] = "reset"
    """``reset``: a fresh local optimizer every round (classic FedAvg); ``keep``: each client keeps its
    optimizer moments across the rounds it takes part in (2 x adapter bytes per client for AdamW)."""
    weight_decay: float = Field(0.0, ge=0)
    """Weight decay of the local optimizer on the trainable parameters (decoupled for AdamW)."""
    max_grad_norm: float | None = Field(None, gt=0)
    """Clip the trainable parameters' gradient norm to this value every step; null = no clipping."""
    prox_mu: float = Field(0.0, ge=0)
    """FedProx: adds prox_mu / 2 · ||θ - θ_start||² over the adapter to each local loss, θ_start being the
    state the client's round began from (fedavg, declora; refused by sl and splitlora); 0 = off."""
    correction: Literal["none", "scaffold"] = "none"
    """Client-drift correction (fedavg, equal ranks, ``aggregator: fedit``): ``scaffold`` (Karimireddy et al.
    2020, option II) moves every local step by -lr (c - c_k), c and c_k being the server's and the
    client's control variates over the adapter, measured as mean step directions (x - y) / (K lr):
    with ``sgd`` that is the paper's gradient correction; with ``adamw`` it stays in AdamW's update
    units. Each round's c (down) and Δc_k (up) are counted as bytes; the variates checkpoint with the run."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """``bf16``: forward and backward under torch.autocast (matmuls in bfloat16, ~1.8x faster per step on
    CPUs with AVX512-BF16, half the activation memory); parameters, optimizer moments, aggregation
    and the bytes on the wire stay fp32."""


class FederationConfig(_Strict):
    """How the server combines client adapters (fedavg; the client-side adapters of splitlora), and
    which LoRA rank each client trains."""

    aggregator: AggregatorName = "fedit"
    """``fedit``: average every tensor (equal ranks); ``product``: mean of the updates B·A re-factored at
    rank r (equal ranks); ``zero_pad`` (HetLoRA): pad factors to the largest rank and average; ``svd``
    (FlexLoRA): SVD of the mean update, each client's top components; ``stack`` (FLoRA, fedavg only): exact
    stacked update merged into the base, fresh adapters each round; ``hlora``: svd with ranks by data size;
    ``lora_fair`` (LoRA-FAIR): fedit plus a server residual on B so that B·A matches the mean update (equal ranks);
    ``hafl`` (HAFL, fedavg only): components ranked by the clients' importance scores, the most important
    to each client (``hafl_mode``), each rank-1 component averaged over the clients that hold it."""
    max_update_norm: Annotated[float, Field(gt=0)] | Literal["auto"] | None = None
    """Drop a client update whose L2 distance from what the client was sent (over A, B and the head)
    exceeds this, for that round (fedavg, declora; ``rejected_updates`` in metrics.jsonl); ``auto``:
    10x the round's median; null: no bound. Wrong keys, shapes, dtypes or NaN/inf are always dropped."""
    lora_mode: Literal["standard", "ffa", "rolora", "fedsa"] = "standard"
    """Which LoRA factors train and travel (fedavg, equal ranks, ``aggregator: fedit``): ``standard`` both;
    ``ffa`` (FFA-LoRA): A stays at its seeded init and never travels, only B (and the head) train: the
    average is exact and the LoRA bytes halve; ``rolora`` (RoLoRA): B trains in odd rounds, A in even
    ones, the other factor frozen at the global: exact, one factor up per round, down the factor the
    last round changed (both to a client not sampled last round); ``fedsa`` (FedSA-LoRA): A and the head
    are averaged, each client keeps its own B (personalised; needs ``eval.client_holdout`` to evaluate
    each client's own model)."""
    rank_partitioned: bool = False
    """``svd`` / ``hlora`` (raFLoRA): average each rank partition of the clients' updates over the clients
    that reach it, against "rank collapse" onto the smallest rank (colora/aggregation/rank_partition.py)."""
    min_clients: int | None = Field(None, ge=1)
    """Deployment (``colora deploy``) only: a round whose answers number fewer than this stops the run
    (its last checkpoint kept for ``--resume``); null: at least one. Clients that do not answer within
    ``round_timeout_s`` (killed, disconnected, too slow) are left out of that round and listed in
    metrics.jsonl's ``dropouts``; the simulation never drops a client."""
    round_timeout_s: float = Field(600.0, gt=0)
    """Deployment only: seconds the server waits for a round's answers (and for data owners to join)."""
    secure_aggregation: bool = False
    """fedavg: the server learns only the clients' weighted mean, never one client's update. Deployed
    (``colora deploy``), through Flower's SecAgg+ (masked, quantized vectors: each value clipped to
    ±8 and rounded to 16/2^22 ≈ 3.8e-6 stochastically; a round needs >= 2 answering clients and
    half of them to unmask); simulated, the plain weighted mean (the reference). Needs
    ``aggregator: fedit`` and nothing that reads single updates (robust rules, max_update_norm,
    client-level DP, attacks, HAFL, SCAFFOLD, lora_mode, kept optimizer moments)."""
    hafl_mode: Literal["truncate", "freeze"] = "truncate"
    """``aggregator: hafl``: ``truncate``: a client of rank r receives and trains the global's r most important
    components; ``freeze``: every client holds the global at its full rank and trains only its r most
    important components (r from ``ranks`` / ``rank_rule``), the rest frozen; it sends back only those."""
    lora_fair_lambda: float = Field(0.01, ge=0)
    """``aggregator: lora_fair``: ridge weight of the server's residual ΔB; large values give plain fedit."""
    robust: Literal["none", "median", "trimmed_mean", "krum", "multi_krum", "norm_clip"] = "none"
    """Robust aggregation (colora/aggregation/robust) before fedavg's ``aggregator``, or as each Dec-LoRA
    node's combination of its neighbours (plain gossip): ``median`` /
    ``trimmed_mean``: coordinate-wise over the clients' ΔW = (alpha/r)·B·A, re-factored at the global rank;
    ``krum`` / ``multi_krum``: keep the update(s) closest to their neighbours (ΔW distances);
    ``norm_clip``: clip each parameter-space update to ``robust_clip``."""
    robust_f: int = Field(1, ge=0)
    """Krum / multi-Krum: the number of attacking clients a round is assumed to hold."""
    trim_fraction: float = Field(0.1, ge=0.0, lt=0.5)
    """``trimmed_mean``: share of the largest and of the smallest values dropped per entry."""
    robust_clip: Annotated[float, Field(gt=0)] | Literal["auto"] = "auto"
    """``norm_clip``: the largest update norm kept as it is; ``auto``: the round's median norm."""
    server_optimizer: Literal["none", "fedavgm", "fedadam", "fedyogi"] = "none"
    """Server step on the pseudo-gradient (global minus aggregate): ``none`` takes the aggregate;
    ``fedavgm``: heavy-ball momentum; ``fedadam``, ``fedyogi``: adaptive (Reddi et al. 2021).
    fedavg with ``aggregator: fedit`` only."""
    server_lr: float = Field(1.0, gt=0)
    """Server optimizer step size (unused with ``server_optimizer: none``)."""
    server_momentum: float = Field(0.9, ge=0, lt=1)
    """Momentum of fedavgm; first-moment decay (beta1) of fedadam and fedyogi."""
    server_beta2: float = Field(0.99, ge=0, lt=1)
    """Second-moment decay (beta2) of fedadam and fedyogi."""
    server_tau: float = Field(1.0e-3, gt=0)
    """Adaptivity tau of fedadam and fedyogi: added to sqrt(v), and v starts at tau²."""
    weighting: Literal["samples", "uniform"] = "samples"
    """Client weights in aggregation: ``samples`` by local data size (FedAvg); ``uniform`` equal."""
    ranks: list[int] | None = None
    """One LoRA rank per client (``clients.num`` entries, each > 0), overriding ``rank_rule``; null = use
    ``rank_rule``. Mixed ranks need zero_pad, svd, stack, hlora or hafl (fedit, product and sl refuse them)."""
    rank_rule: Literal["uniform", "data_size", "resource"] = "uniform"
    """``uniform``: every client at ``model.lora.r``; ``data_size`` (HLoRA): data-size quantile groups get
    increasing ranks from ``rank_set``; ``resource``: ranks from each client's FLOP/s tier, capped so the
    estimated training memory fits its ``memory_gb``."""
    rank_set: list[int] = [2, 4, 8]
    """The ranks ``data_size``, ``resource`` and ``aggregator: hlora`` choose from (non-empty, each > 0)."""
    # HetLoRA options of the zero_pad aggregator (colora/aggregation/zero_pad.py).
    hetlora_sparsity_weighting: bool = False
    """zero_pad only (HetLoRA): also weigh each module's clients by the norm of their update ||ΔW_k||_F."""
    hetlora_prune_gamma: float | None = Field(None, gt=0, lt=1)
    """zero_pad only (HetLoRA rank self-pruning): a client whose tail components [gamma·r, r) carry less
    than last time drops to rank max(1, floor(gamma·r)); null = off. Not for sl and splitlora."""

    @model_validator(mode="after")
    def _ranks_positive(self) -> "FederationConfig":
        for key in ("ranks", "rank_set"):
            for r in getattr(self, key) or []:
                if r <= 0:
                    raise ValueError(f"federation.{key} holds rank {r}; every LoRA rank must be > 0")
        if not self.rank_set:
            raise ValueError("federation.rank_set is empty; it needs at least one LoRA rank")
        hetlora = {"hetlora_sparsity_weighting": self.hetlora_sparsity_weighting, "hetlora_prune_gamma": self.hetlora_prune_gamma}
        for key, value in hetlora.items():
            if value not in (False, None) and self.aggregator != "zero_pad":
                raise ValueError(f"federation.{key}={value} applies to federation.aggregator=zero_pad only (got {self.aggregator})")
        if self.hafl_mode != "truncate" and self.aggregator != "hafl":
            raise ValueError(f"federation.hafl_mode={self.hafl_mode} applies to federation.aggregator=hafl only (got {self.aggregator})")
        if self.aggregator == "hlora" and (self.ranks is not None or self.rank_rule == "resource"):
            raise ValueError("federation.aggregator=hlora assigns ranks by data size (HLoRA); "
                             "use aggregator=svd with federation.ranks or rank_rule=resource")
        return self


class SplitConfig(_Strict):
    """Split learning (``sl``, ``splitlora``): where the model is cut and what crosses the cut."""

    layer: int = Field(3, gt=0)
    """Cut before this block: the client runs embeddings + blocks [0, layer), the server the rest;
    must lie in [1, n_layers - 1]."""
    server: Literal["shared", "per_client"] = "shared"
    """``shared`` (SplitFed-V2): one server adapter, updated for each client's batch in turn;
    ``per_client`` (SplitFed-V1): one server adapter per client, averaged with the client adapters.
    ``sl`` needs shared."""
    aggregate_every: int = Field(10, gt=0)
    """splitlora: average the client-side adapters every this many local steps (and at each round's end)."""
    u_shaped: bool = False
    """true: head and loss stay on the client, so labels never leave it (one more exchange per step);
    false: labels travel to the server with every batch."""
    activation_dtype: Literal["fp32", "bf16", "fp16", "int8"] = "fp32"
    """Encoding of activations and gradients sent across the cut: ``fp32`` (4 bytes/value, exact),
    ``bf16`` or ``fp16`` (2 bytes/value), ``int8`` (per-row scales, about a quarter of fp32)."""


class GossipConfig(_Strict):
    """Decentralized training (``declora``): the communication graph and how neighbours mix."""

    topology: str = "ring"
    """ring, complete, erdos_renyi, torus, grid, exponential (peers at distance 2^i), star, or the path
    of an edge-list file (``i j`` per line; pinned by content hash for ``--resume``)."""
    p: float = Field(0.3, ge=0, le=1)
    """Edge probability of ``erdos_renyi`` (seeded)."""
    mixing: Literal["metropolis", "laplacian", "uniform"] = "metropolis"
    """Doubly stochastic mixing matrix: ``metropolis`` (Metropolis-Hastings weights), ``laplacian``
    (I - 2L/(3·λmax)), ``uniform`` (1/n; complete graph only)."""
    quantize_bits: Literal[0, 4, 8] = 0
    """0 = full-precision gossip; 8 or 4: CHOCO-compressed gossip of differences, stochastically
    rounded to that many bits (per-row scales)."""
    topk: float = Field(0.0, ge=0, le=1)
    """0 = off; else CHOCO gossip sends only this fraction of each tensor's entries (largest |x|)."""
    gamma: float = Field(1.0, gt=0, le=1)
    """Consensus step size of compressed (CHOCO) gossip; unused without compression."""
    time_varying: bool = False
    """true: a new graph every round (erdos_renyi: a fresh draw; others: a random relabelling); every
    5-round window's union must be connected."""
    eval_clients: bool = False
    """true: also evaluate each client's own adapter and log mean/min/max (one extra evaluation per
    client at every evaluation)."""


class DeviceProfile(_Strict):
    """One device class of the cost model: compute speed, links, memory."""

    flops: float = Field(gt=0)
    """Sustained FLOP/s on training work (not the datasheet peak)."""
    up_mbps: float = Field(gt=0)
    """Uplink rate, megabit/s."""
    down_mbps: float = Field(gt=0)
    """Downlink rate, megabit/s."""
    latency_s: float = Field(ge=0)
    """One-way latency per message, seconds."""
    memory_gb: float = Field(gt=0)
    """Memory the device can give to training, GB (checked against the training-memory estimate)."""


PRESETS_FILE = Path(__file__).with_name("presets") / "system.yaml"
PROFILE_FIELDS = ("flops", "up_mbps", "down_mbps", "latency_s", "memory_gb")


def load_presets(path: str | None = None) -> dict[str, dict]:
    """Named device presets: colora's own (``colora/presets/system.yaml``), then ``path``'s (same format), which win.

    A malformed file (not UTF-8, not YAML, not a mapping of name -> {client: {...}, server: {...}})
    is a ValueError naming the file and the first problem."""
    presets = yaml.safe_load(PRESETS_FILE.read_text())
    if path is not None:
        what = f"system.presets_file={path!r}"
        try:
            own = read_yaml(Path(path).expanduser(), "system.presets_file")
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        if own is None:
            own = {}
        if not isinstance(own, dict):
            raise ValueError(f"{what}: expected a mapping of preset names to {{client: ..., server: ...}}")
        for name, preset in own.items():
            if not isinstance(preset, dict) or set(preset) - {"client", "server"} or not all(
                    isinstance(preset.get(role, {}), dict) for role in ("client", "server")):
                raise ValueError(f"{what}: preset {quote(name)} must be a mapping with 'client' and/or 'server' "
                                 f"profiles ({', '.join(PROFILE_FIELDS)})")
            presets[name] = {role: {**presets.get(name, DEFAULT_PROFILES)[role], **(preset.get(role) or {})}
                             for role in ("client", "server")}
    return presets


class Heterogeneity(_Strict):
    """How client devices differ around ``system.client`` (drawn once per run from ``seed``).

    Each client's value of every field in ``fields`` is the base value times its own factor:
    ``fixed``: 1; ``uniform``: U[1 - spread, 1 + spread]; ``lognormal``: exp(N(-spread²/2, spread)),
    whose mean is 1, so ``system.client`` stays the average device.
    """

    distribution: Literal["fixed", "uniform", "lognormal"] = "fixed"
    """``fixed``: every client is ``system.client``; ``uniform`` or ``lognormal``: each client's fields
    times its own factor, drawn from the run's seed (see above)."""
    spread: float = Field(0.0, ge=0)
    """Width of the factors' distribution (uniform: below 1); 0 = identical clients."""
    fields: list[Literal["flops", "up_mbps", "down_mbps", "latency_s", "memory_gb"]] = ["flops", "up_mbps", "down_mbps"]
    """The profile fields that vary across clients, each with its own independent factor."""

    @model_validator(mode="after")
    def _positive(self) -> "Heterogeneity":
        if self.distribution == "uniform" and self.spread >= 1:
            raise ValueError(f"system.heterogeneity.spread={self.spread}: a uniform spread must be below 1 (rates stay positive)")
        return self


# Without a preset: a laptop-class client on a home link, a single data-centre GPU server.
DEFAULT_PROFILES = {"client": {"flops": 1.0e12, "up_mbps": 20, "down_mbps": 100, "latency_s": 0.05, "memory_gb": 8},
                    "server": {"flops": 1.0e14, "up_mbps": 10_000, "down_mbps": 10_000, "latency_s": 0.001, "memory_gb": 80}}


class SystemConfig(_Strict):
    """Device profiles of the cost model: a named preset (or the defaults), single fields overridden
    under client/server (``--set system.client.up_mbps=5`` keeps the other fields)."""

    presets_file: str | None = None
    """A YAML file of your own presets, in the format of ``colora/presets/system.yaml``; its names win
    over the built-in ones. Pinned by content hash for ``--resume``."""
    preset: str | None = None
    """A named preset: edge-weak, edge-strong, datacenter, fast-client-slow-link, or one of
    ``presets_file``; null = the defaults below (a laptop-class client on a home link, one data-centre GPU server)."""
    enforce_memory: bool = False
    """true: stop before training if a client's estimated training memory exceeds its ``memory_gb``;
    false: list such clients in system.json and warn."""
    client: DeviceProfile = DeviceProfile(**DEFAULT_PROFILES["client"])
    """Every client's base device profile (before ``heterogeneity``); defaults come from ``preset``."""
    server: DeviceProfile = DeviceProfile(**DEFAULT_PROFILES["server"])
    """The server's device profile (``central`` training, the server side of split learning, aggregation)."""
    heterogeneity: Heterogeneity = Heterogeneity()
    """How client devices differ around ``system.client``."""

    @model_validator(mode="before")
    @classmethod
    def _fill_profiles(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        base = DEFAULT_PROFILES
        if data.get("preset"):
            presets = load_presets(data.get("presets_file"))
            name = data["preset"]
            if name not in presets:
                raise ValueError(f"system.preset={name!r} is not a known preset (known: {', '.join(sorted(presets))}; "
                                 f"add your own with system.presets_file)")
            base = presets[name]
        out = dict(data)
        for role in ("client", "server"):
            given = data.get(role) or {}
            if isinstance(given, BaseModel):
                given = given.model_dump()
            out[role] = {**base[role], **given} if isinstance(given, dict) else given
        return out


class LogConfig(_Strict):
    """What a run writes and shows besides metrics.jsonl."""

    tensorboard: bool = False
    """true: write every metrics row as TensorBoard scalars under ``RUN_DIR/tensorboard`` (needs the ``tb`` extra)."""
    progress: bool = True
    """true: a progress bar when stderr is a terminal; false: never (the per-round log lines stay)."""


class EvalConfig(_Strict):
    """Evaluation of the global adapter on the eval split."""

    every: int = Field(1, gt=0)
    """Evaluate every this many rounds (round 0 and the last round are always evaluated)."""
    generate: int = Field(0, ge=0)
    """Data-to-text (E2E): greedy generation for this many distinct eval inputs, scored with BLEU,
    NIST, ROUGE-L, CIDEr (colora.nlg); 0 = off."""
    max_new_tokens: int = Field(64, gt=0)
    """Most tokens generated per input when ``generate`` is on."""
    client_holdout: float = Field(0.0, ge=0, lt=1)
    """fedavg: this share of every client's data (seeded, at least one example) is held out of its
    training, and every eval round the model each client uses (the global; under ``lora_mode: fedsa``
    its own) is scored on its own held-out slice: ``eval_clients/mean_*``, ``min_*``, ``max_*`` in
    metrics.jsonl. 0 = off. Hold out the same share in every run of a comparison."""


class EngineConfig(_Strict):
    """Where the client work runs. Results are equal on every engine and device at a fixed seed up to
    floating-point order (a GPU's kernels round differently from a CPU's)."""

    kind: Literal["inprocess", "workers", "ray"] = "inprocess"
    """``inprocess``: one resident frozen base model, clients simulated one after another (the reference);
    ``workers``: ``workers`` processes on this machine mapping ONE copy of the base weights, clients in
    parallel; ``ray``: Ray actors (the ``ray`` extra), on a local or an existing cluster."""
    workers: int = Field(2, ge=1)
    """Worker processes (``workers``) or actors (``ray``); each runs with cores // workers threads.
    ``workers`` refuses more than this machine's cores."""
    address: str | None = Field(None, max_length=500)
    """``ray`` only: an existing cluster to join (``auto``, ``ray://host:port`` or ``host:port``); null
    starts a local Ray instance for the run."""
    fuse: int = Field(1, ge=1, le=64)
    """Clients trained together in ONE batched forward/backward over the shared base (colora.fused):
    the base GEMMs run once for all their rows, each client's LoRA delta on its own rows. Results equal
    ``fuse: 1`` (one client after another) up to floating-point order; a fused pass holds K clients'
    activations (refused before training when this machine's free memory cannot hold them). Applies
    to the parallel clients of fedavg and declora and to splitlora with ``split.server: per_client``
    (client parts and server copies both fused); ``split.server: shared`` and ``sl`` train one client
    after another by definition and ignore it. Pays on a GPU; on a CPU see the README's benchmark."""
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    """``auto`` (CUDA when a GPU is visible, else CPU), ``cpu``, ``cuda`` or ``cuda:N``: where the model,
    batches, evaluation and split messages compute; adapter states travel between parties on the CPU."""

    @model_validator(mode="after")
    def _fits_the_machine(self) -> "EngineConfig":
        cores = os.cpu_count() or 1
        if self.kind == "workers" and self.workers > cores:
            raise ValueError(f"workers={self.workers} exceeds the {cores} cores of this machine; use engine.workers <= {cores}")
        if self.address is not None and self.kind != "ray":
            raise ValueError(f"address={self.address!r} is for kind=ray (kind is {self.kind}); remove it or set engine.kind=ray")
        return self


class PrivacyConfig(_Strict):
    """Differential privacy (colora.privacy): client-level DP-FedAvg or record-level DP-SGD, with an RDP
    accountant."""

    mode: Literal["none", "client", "local"] = "none"
    """``client``: clip each client's update to ``clip`` and add Gaussian noise at aggregation (fedavg with
    aggregator fedit; protects a client's whole data set); ``local``: DP-SGD in every client, each
    step's per-sample gradients clipped to ``clip`` plus Gaussian noise (fedavg, declora, central;
    protects each record; the ``privacy`` extra's Opacus computes per-sample gradients); ``none``."""
    clip: float = Field(1.0, gt=0)
    """L2 bound of one client's update per round (``client``) or of one record's gradient per step
    (``local``), over the LoRA factors and the head together."""
    noise_multiplier: float = Field(0.0, ge=0)
    """Noise std over ``clip``; 0 clips without noise (an ablation: no guarantee, ``epsilon`` null)."""
    delta: float = Field(1.0e-5, gt=0, lt=1)
    """The delta of the (epsilon, delta) guarantee reported as ``epsilon`` in metrics.jsonl."""
    target_epsilon: float | None = Field(None, gt=0)
    """Refuse, before training, a config whose rounds would spend more than this."""


class Config(_Strict):
    """The whole experiment. Field names and defaults follow CONTRACT.md."""

    name: str | None = Field(None, max_length=200)
    """Run name: the run directory is ``runs/<name>-<timestamp>`` unless ``--out`` is given (default: the config file's stem)."""
    seed: int = Field(0, ge=0)
    """Seeds everything: partitions, client sampling, batches, LoRA init, dropout."""
    algorithm: AlgorithmName = "fedavg"
    """The paradigm: ``central`` (LoRA on the pooled data), ``fedavg`` (federated LoRA), ``sl`` (sequential
    split learning), ``splitlora`` (parallel split learning, SplitLoRA), ``declora`` (serverless gossip, Dec-LoRA)."""
    engine: EngineConfig = EngineConfig()
    """Where client work runs (a plain ``engine: inprocess``, the older form, still loads)."""
    rounds: int = Field(20, gt=0)
    """Communication rounds; each takes ``train.local_steps`` steps per client (central: on the pooled data)."""
    model: ModelConfig = ModelConfig()
    """The base model and its LoRA adapter."""
    data: DataConfig = DataConfig()
    """The data set."""
    clients: ClientsConfig = ClientsConfig()
    """The clients and the data partition."""
    train: TrainConfig = TrainConfig()
    """Local training."""
    federation: FederationConfig = FederationConfig()
    """Aggregation, server optimizer and per-client ranks."""
    split: SplitConfig = SplitConfig()
    """Split learning (sl, splitlora)."""
    gossip: GossipConfig = GossipConfig()
    """Gossip (declora)."""
    system: SystemConfig = SystemConfig()
    """Device profiles of the cost model (simulated time, memory check)."""
    log: LogConfig = LogConfig()
    """Logging."""
    eval: EvalConfig = EvalConfig()
    """Evaluation."""
    privacy: PrivacyConfig = PrivacyConfig()
    """Differential privacy."""

    pinned_inputs: dict[str, str] = {}
    """Written by colora, not by you: the sha256 of every input file a run reads, by config key
    (``data.path``, ``gossip.topology``, ``system.presets_file``); ``--resume`` refuses to go on if one changed."""

    @model_validator(mode="before")
    @classmethod
    def _engine_by_name(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("engine"), str):  # `engine: inprocess` (before the section)
            data = {**data, "engine": {"kind": data["engine"]}}
        return data

    @model_validator(mode="after")
    def _privacy_where_it_holds(self) -> "Config":
        p = self.privacy
        if p.mode == "local":
            if self.algorithm in ("sl", "splitlora"):
                raise ValueError(f"privacy.mode=local gives no guarantee for algorithm={self.algorithm}: split learning sends "
                                 "activations, the data itself transformed, which no noise on gradients protects; use fedavg, "
                                 "declora or central")
            if self.engine.fuse > 1:
                raise ValueError("privacy.mode=local needs per-sample gradients, which fused passes do not compute; "
                                 "set engine.fuse=1")
        if p.mode == "client":
            why = {"sl": "split learning sends activations, the data itself transformed: no noise on updates protects them",
                   "splitlora": "split learning sends activations, the data itself transformed: no noise on updates protects them",
                   "declora": "gossip mixes un-noised node states (no per-node noise yet)",
                   "central": "there is one pooled data set and no client updates"}.get(self.algorithm)
            if why:
                raise ValueError(f"privacy.mode=client gives no guarantee for algorithm={self.algorithm}: {why}; use fedavg")
            if self.federation.aggregator != "fedit" or self.federation.robust != "none":
                raise ValueError("privacy.mode=client adds noise to the plain sum of clipped parameter updates: it needs "
                                 "federation.aggregator=fedit and federation.robust=none")
        if p.mode != "none" and p.noise_multiplier <= 0 and p.target_epsilon is not None:
            raise ValueError(f"privacy.target_epsilon={p.target_epsilon:g} cannot hold with privacy.noise_multiplier=0 "
                             "(clipping alone gives no guarantee: epsilon is infinite); raise privacy.noise_multiplier")
        return self

    @model_validator(mode="after")
    def _robust_where_a_server_aggregates(self) -> "Config":
        fed = self.federation
        if fed.robust != "none" and self.algorithm not in ("fedavg", "declora"):
            raise ValueError(f"federation.robust={fed.robust}: robust aggregation runs in fedavg's server and in Dec-LoRA's "
                             f"nodes (algorithm is {self.algorithm}); set federation.robust=none")
        if fed.robust != "none" and self.algorithm == "declora" and (self.gossip.quantize_bits or self.gossip.topk):
            raise ValueError(f"federation.robust={fed.robust}: a node combines its neighbours' full states; compressed "
                             "gossip (gossip.quantize_bits / topk) only ever sends differences; turn compression off")
        if fed.robust in ("krum", "multi_krum") and self.algorithm == "fedavg" and self.clients.per_round <= 2 * fed.robust_f + 2:
            raise ValueError(f"federation.robust={fed.robust} tolerates robust_f={fed.robust_f} attackers only with more than "
                             f"2 x robust_f + 2 = {2 * fed.robust_f + 2} clients a round (clients.per_round="
                             f"{self.clients.per_round}); sample more clients or lower federation.robust_f")
        if fed.robust in ("median", "trimmed_mean") and fed.aggregator == "stack":
            raise ValueError(f"federation.robust={fed.robust} re-factors one ΔW at the global rank; aggregator=stack merges "
                             "stacked updates into the base instead; use svd or zero_pad")
        return self

    @model_validator(mode="after")
    def _drift_fixes_where_factors_are_averaged(self) -> "Config":
        fed, what = self.federation, []
        if fed.lora_mode != "standard":
            what.append(f"federation.lora_mode={fed.lora_mode}")
        if self.train.correction != "none":
            what.append(f"train.correction={self.train.correction}")
        if not what:
            return self
        if self.algorithm != "fedavg":
            raise ValueError(f"{what[0]} is for fedavg (algorithm is {self.algorithm}); set it back to its default")
        if fed.lora_mode == "rolora" and fed.server_optimizer != "none":
            raise ValueError(f"federation.lora_mode=rolora rests one factor each round, but "
                             f"federation.server_optimizer={fed.server_optimizer} would keep moving it by momentum; "
                             "set federation.server_optimizer=none")
        if fed.lora_mode == "fedsa" and self.eval.client_holdout == 0:
            raise ValueError("federation.lora_mode=fedsa trains a personal B per client, scored on the client's own data: "
                             "set eval.client_holdout (e.g. 0.2)")
        if fed.aggregator != "fedit" or (fed.ranks and len(set(fed.ranks)) > 1) or fed.rank_rule != "uniform":
            raise ValueError(f"{what[0]} keeps factors in one shared coordinate system: it needs equal ranks and "
                             f"federation.aggregator=fedit (got {fed.aggregator}); use fedit and one rank")
        return self

    @model_validator(mode="after")
    def _secure_aggregation_sees_only_the_sum(self) -> "Config":
        fed = self.federation
        if not fed.secure_aggregation:
            return self
        if self.algorithm != "fedavg":
            raise ValueError(f"federation.secure_aggregation hides fedavg's client updates (algorithm is {self.algorithm}); "
                             "set it to false")
        reads_updates = {
            "federation.aggregator": fed.aggregator != "fedit", "federation.robust": fed.robust != "none",
            "federation.max_update_norm": fed.max_update_norm is not None, "privacy.mode=client": self.privacy.mode == "client",
            "clients.byzantine": self.clients.byzantine.fraction > 0, "train.correction": self.train.correction != "none",
            "federation.lora_mode": fed.lora_mode != "standard", "train.client_optimizer=keep": self.train.client_optimizer == "keep",
            "mixed ranks": bool(fed.ranks and len(set(fed.ranks)) > 1) or fed.rank_rule != "uniform"}
        clash = [k for k, v in reads_updates.items() if v]
        if clash:
            raise ValueError(f"federation.secure_aggregation gives the server only the weighted mean of the updates, but "
                             f"{clash[0]} needs each client's own; turn one of them off")
        if self.clients.per_round < 2:
            raise ValueError("federation.secure_aggregation needs clients.per_round >= 2 (one client's sum is its update)")
        return self

    @model_validator(mode="after")
    def _hafl_ranks_components_of_fedavg(self) -> "Config":
        if self.federation.aggregator != "hafl":
            return self
        if self.algorithm != "fedavg":
            raise ValueError(f"federation.aggregator=hafl ranks components by scores its fedavg clients measure "
                             f"(algorithm is {self.algorithm}); use zero_pad or svd")
        if self.train.client_optimizer == "keep":
            raise ValueError("federation.aggregator=hafl re-orders the global's components every round, so kept optimizer "
                             "moments would belong to other components; set train.client_optimizer=reset")
        if self.privacy.mode == "client" or self.federation.robust != "none":
            raise ValueError("federation.aggregator=hafl pairs each client's components with its scores; privacy.mode=client "
                             "and federation.robust change or drop states apart from them: use zero_pad or svd with those")
        return self

    @model_validator(mode="after")
    def _rank_partitions_of_an_svd(self) -> "Config":
        if self.federation.rank_partitioned and self.federation.aggregator not in ("svd", "hlora"):
            raise ValueError(f"federation.rank_partitioned re-weights the SVD rules' rank partitions: it needs "
                             f"federation.aggregator=svd or hlora (got {self.federation.aggregator})")
        return self

    @model_validator(mode="after")
    def _holdout_where_clients_use_a_model(self) -> "Config":
        if self.eval.client_holdout > 0 and self.algorithm != "fedavg":
            raise ValueError(f"eval.client_holdout scores fedavg's clients on their own data (algorithm is {self.algorithm}); "
                             "set it to 0 (declora: gossip.eval_clients)")
        return self

    @model_validator(mode="after")
    def _attacks_where_updates_are_sent(self) -> "Config":
        if self.clients.byzantine.fraction > 0 and self.algorithm not in ("fedavg", "declora"):
            raise ValueError(f"clients.byzantine: attacking clients are simulated for fedavg and declora (algorithm is "
                             f"{self.algorithm}); set clients.byzantine.fraction=0")
        return self

    @model_validator(mode="after")
    def _shared_base_is_unquantized(self) -> "Config":
        if self.engine.kind != "inprocess" and self.model.quantize != "none":
            raise ValueError(f"engine.kind={self.engine.kind} shares one unquantized copy of the base weights between its "
                             f"processes; model.quantize={self.model.quantize} needs engine.kind=inprocess")
        return self

    @model_validator(mode="after")
    def _name_is_a_folder_name(self) -> "Config":
        if self.name is not None and (not self.name or any(c in self.name for c in "/\\\0") or self.name in (".", "..")):
            raise ValueError(f"name={quote(self.name)}: a run name becomes a folder under runs/, so it cannot be "
                             f"empty, '.' or '..', or hold '/' or '\\'")
        return self

    @model_validator(mode="after")
    def _label_skew_proportions(self) -> "Config":
        if self.clients.partition == "label_skew":
            _check_proportions(self.clients)
        return self

    @model_validator(mode="after")
    def _cross_checks(self) -> "Config":
        if self.clients.per_round > self.clients.num:
            raise ValueError(
                f"clients.per_round={self.clients.per_round} exceeds clients.num={self.clients.num}"
            )
        if self.federation.ranks is not None and len(self.federation.ranks) != self.clients.num:
            raise ValueError(
                f"federation.ranks has {len(self.federation.ranks)} entries but clients.num={self.clients.num}"
            )
        if self.federation.aggregator == "stack" and self.model.quantize != "none":
            raise ValueError(f"federation.aggregator=stack merges the update into the base weights, which "
                             f"model.quantize={self.model.quantize} keeps quantized; use svd or model.quantize=none")
        return self


def _check_proportions(c: ClientsConfig) -> None:
    """clients.proportions for label_skew: one row per client, equal lengths, rows >= 0 summing to 1."""
    rows = c.proportions
    if rows is None:
        raise ValueError("clients.partition=label_skew needs clients.proportions (one row of class proportions per client)")
    if len(rows) != c.num:
        raise ValueError(f"clients.proportions has {len(rows)} rows but clients.num={c.num}")
    for i, row in enumerate(rows):
        if not row or len(row) != len(rows[0]):
            raise ValueError(f"clients.proportions row {i} has {len(row)} entries; every row needs one per class ({len(rows[0])})")
        if min(row) < 0 or abs(sum(row) - 1.0) > 1e-6:
            raise ValueError(f"clients.proportions row {i}={row}: entries must be >= 0 and sum to 1 (within 1e-6)")


def _format_validation_error(err: ValidationError) -> str:
    first = err.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in first["loc"])[:QUOTE_CHARS]
    if first["type"] == "extra_forbidden":
        return f"unknown config key '{loc}'"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "finite_number":
        msg = "inf and NaN are not allowed; give a finite number"
    if not loc or msg.startswith(f"{loc}."):  # a cross-field or section check already names its keys
        return msg
    return f"{loc}={quote(first.get('input'))}: {msg}"


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    node = raw
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``a.b=value`` and parse the value as a YAML scalar or list."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set expects KEY=VALUE, got {quote(text)}")
    return key.strip(), parse_yaml(value, f"--set {key.strip()[:QUOTE_CHARS]}")


def build_config(raw: dict | None, overrides: dict[str, Any] | None = None) -> Config:
    """Validate a raw mapping (plus dotted overrides) into a :class:`Config`."""
    raw = copy.deepcopy(raw or {})
    if not isinstance(raw, dict):
        raise ConfigError("the config file must hold a mapping of keys at its top level")
    for key, value in (overrides or {}).items():
        _set_dotted(raw, key, value)
    _absolute_input_paths(raw)
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc)) from None
    if cfg.data.path is not None and not Path(cfg.data.path).exists():
        raise ConfigError(f"data.path={quote(cfg.data.path)}: no such file or folder")
    return cfg


# Built-in gossip topologies (colora.topology builds them); any other gossip.topology is a file path.
TOPOLOGY_NAMES = ("ring", "complete", "erdos_renyi", "torus", "grid", "exponential", "star")
# Config keys naming files a run reads: made absolute at load (a resumed run from another working
# directory reads the same files) and pinned by content hash in config.yaml (colora.rundir).
INPUT_KEYS = ("data.path", "gossip.topology", "system.presets_file")


def _absolute_input_paths(raw: dict) -> None:
    """Rewrite each INPUT_KEYS path of ``raw`` that exists as an absolute path (relative paths are
    relative to the working directory); values of the wrong type are left to validation."""
    for key in INPUT_KEYS:
        section, field = key.split(".")
        node = raw.get(section)
        value = node.get(field) if isinstance(node, dict) else None
        if not isinstance(value, str) or (key == "gossip.topology" and value in TOPOLOGY_NAMES):
            continue
        path = Path(value).expanduser()
        if path.exists():
            node[field] = str(path.resolve())


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config file and apply ``--set`` style overrides."""
    path = Path(path)
    raw = read_yaml(path, "config file") or {}
    parsed = dict(parse_override(o) for o in overrides or [])
    cfg = build_config(raw, parsed)
    if cfg.name is None:
        cfg.name = path.stem
    return cfg


def dump_config(cfg: Config) -> str:
    """The fully resolved config as YAML (what ``config.yaml`` in a run directory holds)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
