"""Run artefacts: the distilled-set file (:mod:`.distilled`), image grids (:mod:`.grids`), reports
(:mod:`.report`) and the names of the files a run folder holds."""

DISTILLED_FILE = "distilled.safetensors"  # FedDGM's pool (fedlatent distill), fedlatent.export format
GRID_PATTERN = "grid_round{r}.png"  # FedDGM: distilled images per class of round r
REPORT_FILE = "report.md"  # fedlatent distill: what ran, accuracy per round, timings
PSEUDO_FILE = "pseudo.safetensors"  # DynaFed's pseudo set
PSEUDO_GRID_FILE = "pseudo.png"
SYNTHESIS_LOSS_FILE = "synthesis_loss.png"
