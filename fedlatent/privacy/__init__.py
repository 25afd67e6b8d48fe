"""Privacy of a federated run: memorisation and membership-inference audits, client-side DP-SGD.

* :mod:`.dp` - DP-SGD for the clients' local training (Opacus) and per-client (epsilon, delta) accounting;
* :mod:`.memorisation` - nearest-neighbour tests of synthetic sets against the clients' training images;
* :mod:`.mia` - membership inference against the global model (loss, confidence, LiRA-style);
* :mod:`.audit` - ``fedlatent audit RUN_DIR``: reconstructs members / non-members from a run folder and
  runs both audits; :mod:`.report` writes privacy.json / privacy.md and the report section.
"""
