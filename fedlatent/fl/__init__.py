"""Federated learning: the simulation engine, FedAvg/FedProx and the Strategy contract for other methods.

Entry points: :func:`simulate` (load data, build a method, run, write a run folder) and
:func:`run_simulation` (run a given :class:`Strategy` on an :class:`~fedlatent.data.ImageData`).
"""
from .base import (ClientData, FLConfig, FLContext, Strategy, Upload, available_methods, get_method,
                   register_method, tensor_bytes)
from .aggregate import fedavg, fedprox_term
from .methods.fedavg import FedAvg, FedProx
from .simulation import SimulationResult, client_schedule, clients_per_round, run_simulation, simulate

__all__ = [
    "ClientData", "FLConfig", "FLContext", "Strategy", "Upload", "available_methods", "get_method",
    "register_method", "tensor_bytes", "fedavg", "fedprox_term", "FedAvg", "FedProx", "SimulationResult",
    "client_schedule", "clients_per_round", "run_simulation", "simulate",
]
