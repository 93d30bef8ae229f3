"""Typed, validated experiment configuration.

The YAML file is parsed at the edge into pydantic models with ``extra="forbid"``, so an unknown
key, a wrong type or an impossible value stops the run before any work is done, with a one-line
message naming the dotted key and the offending value (see CONTRACT.md).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ColoraError(Exception):
    """A user-facing error: bad config, bad input, or a run that cannot go on.

    The CLI prints ``colora: error: <message>`` (one line, no traceback) and exits with code 2.
    """


class ConfigError(ColoraError):
    """The configuration names an unknown key or holds a wrong or impossible value."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraConfig(_Strict):
    r: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # null = the model family's default (BERT: query, value; GPT-2: c_attn; LLaMA: q_proj, v_proj).
    target_modules: list[str] | None = None


class ModelConfig(_Strict):
    name: str = "minilm-l6"
    task: Literal["seq-cls", "causal-lm"] = "seq-cls"
    lora: LoraConfig = LoraConfig()
    # Frozen base weights quantized at load (QLoRA-style, colora/quantize.py): int8 or 4-bit NF4.
    quantize: Literal["none", "int8", "4bit"] = "none"


class DataConfig(_Strict):
    name: str = "synthetic"
    path: str | None = None
    max_length: int = Field(128, gt=0)
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    synthetic_train: int = Field(2000, gt=0)
    synthetic_eval: int = Field(500, gt=0)
    max_train: int | None = Field(None, gt=0)
    max_eval: int | None = Field(None, gt=0)


class ClientsConfig(_Strict):
    num: int = Field(10, gt=0)
    per_round: int = Field(10, gt=0)
    partition: Literal["iid", "dirichlet", "shards", "label_skew"] = "iid"
    alpha: float = Field(0.5, gt=0)
    shards_per_client: int = Field(2, gt=0)
    # label_skew: one row per client of class proportions (each row sums to 1), e.g. Dec-LoRA's
    # [[0.15, 0.85], [0.85, 0.15], [0.5, 0.5]]; one entry per class is checked at partition time.
    proportions: list[list[float]] | None = None


class TrainConfig(_Strict):
    local_steps: int = Field(10, gt=0)
    batch_size: int = Field(16, gt=0)
    eval_batch_size: int = Field(64, gt=0)
    lr: float = Field(5.0e-4, gt=0)
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_rounds: int = Field(0, ge=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    # reset: a fresh local optimizer every round (classic FedAvg); keep: each client keeps its
    # optimizer moments across the rounds it takes part in (2 x adapter bytes per client for AdamW).
    client_optimizer: Literal["reset", "keep"] = "reset"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(None, gt=0)
    prox_mu: float = Field(0.0, ge=0)
    # bf16: forward and backward under torch.autocast (matmuls in bfloat16, ~1.8x faster per step on
    # CPUs with AVX512-BF16, half the activation memory); parameters, optimizer moments, aggregation
    # and the bytes on the wire stay fp32.
    precision: Literal["fp32", "bf16"] = "fp32"


class FederationConfig(_Strict):
    aggregator: Literal["fedit", "zero_pad", "svd", "stack", "product", "hlora"] = "fedit"
    server_optimizer: Literal["none", "fedavgm", "fedadam", "fedyogi"] = "none"
    server_lr: float = Field(1.0, gt=0)
    server_momentum: float = Field(0.9, ge=0, lt=1)
    server_beta2: float = Field(0.99, ge=0, lt=1)
    server_tau: float = Field(1.0e-3, gt=0)
    weighting: Literal["samples", "uniform"] = "samples"
    ranks: list[int] | None = None
    rank_rule: Literal["uniform", "data_size", "resource"] = "uniform"
    rank_set: list[int] = [2, 4, 8]
    # HetLoRA options of the zero_pad aggregator (colora/aggregation/zero_pad.py): weigh each module's
    # clients by the norm of their update; rank self-pruning with decay gamma in (0, 1), null = off.
    hetlora_sparsity_weighting: bool = False
    hetlora_prune_gamma: float | None = Field(None, gt=0, lt=1)

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
        if self.aggregator == "hlora" and (self.ranks is not None or self.rank_rule == "resource"):
            raise ValueError("federation.aggregator=hlora assigns ranks by data size (HLoRA); "
                             "use aggregator=svd with federation.ranks or rank_rule=resource")
        return self


class SplitConfig(_Strict):
    layer: int = Field(3, gt=0)
    server: Literal["shared", "per_client"] = "shared"
    aggregate_every: int = Field(10, gt=0)
    u_shaped: bool = False
    activation_dtype: Literal["fp32", "bf16", "fp16", "int8"] = "fp32"


class GossipConfig(_Strict):
    topology: str = "ring"
    p: float = Field(0.3, ge=0, le=1)
    mixing: Literal["metropolis", "laplacian", "uniform"] = "metropolis"
    quantize_bits: Literal[0, 4, 8] = 0
    topk: float = Field(0.0, ge=0, le=1)
    gamma: float = Field(1.0, gt=0, le=1)
    time_varying: bool = False
    eval_clients: bool = False


class DeviceProfile(_Strict):
    """One device class of the cost model: compute speed, links, memory."""

    flops: float = Field(gt=0)  # sustained FLOP/s on training work
    up_mbps: float = Field(gt=0)  # uplink, megabit/s
    down_mbps: float = Field(gt=0)  # downlink, megabit/s
    latency_s: float = Field(ge=0)  # one-way latency per message
    memory_gb: float = Field(gt=0)


PRESETS_FILE = Path(__file__).with_name("presets") / "system.yaml"
PROFILE_FIELDS = ("flops", "up_mbps", "down_mbps", "latency_s", "memory_gb")


def load_presets(path: str | None = None) -> dict[str, dict]:
    """Named device presets: colora's own (``colora/presets/system.yaml``), then ``path``'s (same format), which win."""
    presets = yaml.safe_load(PRESETS_FILE.read_text())
    if path is not None:
        file = Path(path).expanduser()
        if not file.is_file():
            raise ValueError(f"system.presets_file={path!r}: no such file")
        presets.update(yaml.safe_load(file.read_text()) or {})
    return presets


class Heterogeneity(_Strict):
    """How client devices differ around ``system.client`` (drawn once per run from ``seed``).

    Each client's value of every field in ``fields`` is the base value times its own factor:
    ``fixed``: 1; ``uniform``: U[1 - spread, 1 + spread]; ``lognormal``: exp(N(-spread²/2, spread)),
    whose mean is 1, so ``system.client`` stays the average device.
    """

    distribution: Literal["fixed", "uniform", "lognormal"] = "fixed"
    spread: float = Field(0.0, ge=0)
    fields: list[Literal["flops", "up_mbps", "down_mbps", "latency_s", "memory_gb"]] = ["flops", "up_mbps", "down_mbps"]

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
    preset: str | None = None
    enforce_memory: bool = False
    client: DeviceProfile = DeviceProfile(**DEFAULT_PROFILES["client"])
    server: DeviceProfile = DeviceProfile(**DEFAULT_PROFILES["server"])
    heterogeneity: Heterogeneity = Heterogeneity()

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
    tensorboard: bool = False
    progress: bool = True


class EvalConfig(_Strict):
    every: int = Field(1, gt=0)
    # Data-to-text (E2E): greedy generation for this many distinct eval inputs, scored with BLEU,
    # NIST, ROUGE-L, CIDEr (colora.nlg); 0 = off.
    generate: int = Field(0, ge=0)
    max_new_tokens: int = Field(64, gt=0)


class Config(_Strict):
    """The whole experiment. Field names and defaults follow CONTRACT.md."""

    name: str | None = None
    seed: int = 0
    algorithm: Literal["central", "fedavg", "sl", "splitlora", "declora"] = "fedavg"
    engine: Literal["inprocess"] = "inprocess"
    rounds: int = Field(20, gt=0)
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    clients: ClientsConfig = ClientsConfig()
    train: TrainConfig = TrainConfig()
    federation: FederationConfig = FederationConfig()
    split: SplitConfig = SplitConfig()
    gossip: GossipConfig = GossipConfig()
    system: SystemConfig = SystemConfig()
    log: LogConfig = LogConfig()
    eval: EvalConfig = EvalConfig()

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
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        return f"unknown config key '{loc}'"
    msg = first["msg"].removeprefix("Value error, ")
    if not loc or msg.startswith(f"{loc}."):  # a cross-field or section check already names its keys
        return msg
    return f"{loc}={first.get('input')!r}: {msg}"


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
        raise ConfigError(f"--set expects KEY=VALUE, got '{text}'")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: cannot parse value '{value}' ({exc.__class__.__name__})") from None


def build_config(raw: dict | None, overrides: dict[str, Any] | None = None) -> Config:
    """Validate a raw mapping (plus dotted overrides) into a :class:`Config`."""
    raw = copy.deepcopy(raw or {})
    if not isinstance(raw, dict):
        raise ConfigError("the config file must hold a mapping of keys at its top level")
    for key, value in (overrides or {}).items():
        _set_dotted(raw, key, value)
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc)) from None
    if cfg.data.path is not None:
        path = Path(cfg.data.path).expanduser()
        if not path.exists():
            raise ConfigError(f"data.path={cfg.data.path!r}: no such file or folder")
        cfg.data.path = str(path.resolve())
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config file and apply ``--set`` style overrides."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file '{path}' is not valid YAML: {str(exc).splitlines()[0]}") from None
    parsed = dict(parse_override(o) for o in overrides or [])
    cfg = build_config(raw, parsed)
    if cfg.name is None:
        cfg.name = path.stem
    return cfg


def dump_config(cfg: Config) -> str:
    """The fully resolved config as YAML (what ``config.yaml`` in a run directory holds)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
