"""Federated LoRA with FedSVD (arXiv 2505.12805): a peft-free core over {layer: (A, B)} state dicts.

    server = make_server("fedsvd", read_state(find_lora_factors(model)))   # or "ffa", "fedavg"
    result = simulate(model, client_datasets, loss_fn, method="fedsvd", rounds=20, dp=DPConfig(target_epsilon=6))

`specpeft.federated.flower` (extra `specpeft[federated]`) runs the same core on Flower.
"""

from .client import ClientPrivacy, DPConfig, LocalTraining, calibrate_noise, sample_rate_for, train_client
from .refactor import refactorize, refactorize_dense, refactorize_qr
from .server import (
    AggregationReport,
    ClientUpdate,
    FedAvgLoRAServer,
    FedSVDServer,
    FFALoRAServer,
    LoRAServer,
    Rejection,
    make_server,
)
from .simulate import RoundMetrics, SimulationResult, classification_eval, dirichlet_split, simulate
from .state import LoRAFactors, LoRAState, clone_state, find_lora_factors, read_state, write_state

__all__ = [
    "AggregationReport",
    "ClientPrivacy",
    "ClientUpdate",
    "DPConfig",
    "FFALoRAServer",
    "FedAvgLoRAServer",
    "FedSVDServer",
    "LoRAFactors",
    "LoRAServer",
    "LoRAState",
    "LocalTraining",
    "Rejection",
    "RoundMetrics",
    "SimulationResult",
    "calibrate_noise",
    "classification_eval",
    "clone_state",
    "dirichlet_split",
    "find_lora_factors",
    "make_server",
    "read_state",
    "refactorize",
    "refactorize_dense",
    "refactorize_qr",
    "sample_rate_for",
    "simulate",
    "train_client",
    "write_state",
]
