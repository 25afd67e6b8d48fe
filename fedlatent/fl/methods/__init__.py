"""The federated methods, one per file: each holds the method's typed config and its client and server steps
(FedAvg/FedProx, FedDF, FedMD, DynaFed, FedDGM, the FedDGM+FedAvg hybrid). A module here registers its Strategy
with :func:`fedlatent.fl.base.register_method`; :func:`fedlatent.fl.base.get_method` imports them on demand."""
